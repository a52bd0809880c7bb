"""Exceptions of the functional QC pipeline.

Each names the file and the problem, with a stable reason token in brackets (``[too_few_volumes]``)
the runner's provenance keeps, so a refused series says why without a traceback.
"""

from __future__ import annotations

#: Why an input is refused: never a plausible number from a series the metrics cannot be taken on.
REFUSALS = {
    "not_bold": "the image is not a 4D time series",
    "too_few_volumes": "fewer volumes than tSNR, DVARS and the outlier indices need (3), or than the protocol's",
    "incomplete": "volumes without signal (a series cut short or zero-filled)",
    "no_signal": "no foreground in the mean image (an empty or constant series)",
}


class BoldError(Exception):
    """Base class for every failure of the ``bold`` pipeline."""


class BoldInputError(BoldError):
    """The input cannot give functional QC: not retryable, the same file fails the same way."""

    def __init__(self, reason: str, message: str):
        if reason not in REFUSALS:
            raise ValueError(f"unknown refusal {reason!r}")
        self.reason = reason
        super().__init__(f"[{reason}] {message}")


class BoldProcessingError(BoldError):
    """A stage gave an implausible result (a diverged realignment)."""


class BoldArgumentError(BoldError, ValueError):
    """A caller's argument is invalid (BIDS label, entity, container digest, threads, volumes)."""
