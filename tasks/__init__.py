"""Prefect tasks of corelab: pure functions with thin ``@task`` wrappers.

Each module holds one concern (inventory, de-identification, protocol, tables,
audit, ...). The pure functions take and return plain typed values and are
tested without Prefect; the ``@task`` wrappers at the bottom of each module are
what flows call.
"""

from tasks import _env  # noqa: F401  (environment defaults before prefect loads)
