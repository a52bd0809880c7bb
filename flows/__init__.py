"""Prefect flows of corelab (thin: they wire tasks and decide) and the CLI."""

from tasks import _env  # noqa: F401
