"""``python -m flows.cli``: the same as the ``corelab`` command."""

from flows.cli import main

main()
