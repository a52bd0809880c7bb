"""One base for every error a stage raises: a reason code the tables store, and whether to retry.

Each stage's error classes derive from :class:`CorelabError` and name their default code; an
instance may carry a more specific one (``InventoryError("pixel_size", ...)``). The codes,
their categories and which are transient live in :mod:`data_contracts.reasons`.

Prefect retries a task only for a transient failure (:func:`transient`, the
``retry_condition_fn`` of :data:`TRANSIENT_RETRIES`): storage, network and container-engine
I/O. A corrupt input, a PHI refusal or a schema violation fails at once, however often it
would be tried.
"""

from __future__ import annotations

from typing import Any, ClassVar

from data_contracts.reasons import REASONS, Reason


class CorelabError(Exception):
    """An error with a reason code (see :mod:`data_contracts.reasons`)."""

    code: ClassVar[str] = "refused"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]  (an instance may be more specific than its class)
        if self.code not in REASONS:
            raise ValueError(f"{type(self).__name__}: reason code {self.code!r} is not in data_contracts.reasons")

    @property
    def reason(self) -> Reason:
        return REASONS[self.code]

    @property
    def retryable(self) -> bool:
        return self.reason.retryable


def is_transient(exc: BaseException | None) -> bool:
    """True for an error that may pass when the same call is made again in a few seconds."""
    return isinstance(exc, CorelabError) and exc.retryable


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only what :func:`is_transient` calls transient."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, raised again by the state
        return is_transient(exc)
    return False


# Task options for stages that read or write the lake, or call a container engine.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [2, 4, 8],   # Prefect's exponential_backoff(2) for 3 retries, without importing
                                        # Prefect here (this module is loaded by `corelab --help`)
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": transient,
}
