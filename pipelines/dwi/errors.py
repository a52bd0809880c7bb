"""Exceptions of the diffusion pipeline.

Each names the file and the problem, with a stable reason token in brackets (``[no_b0]``) the
runner's provenance keeps, so a refused series says why without a traceback.
"""

from __future__ import annotations

#: Why an input is refused: never a plausible number from a table a tensor cannot be fitted to.
REFUSALS = {
    "missing_gradients": "the .bval or .bvec file beside the image is missing or unreadable",
    "gradients_mismatch": "the gradient table does not have one b-value and one direction per volume",
    "no_b0": "no volume with b <= 50 s/mm2 (a tensor needs the unweighted signal)",
    "too_few_directions": "fewer than 6 non-collinear directions (the tensor's 6 elements are not determined)",
    "bvec_not_unit": "a diffusion-weighted volume's direction is not a unit vector",
    "bvalues_mismatch": "a b-value is not one of the protocol's shells",
    "incomplete": "the series lacks volumes (fewer than the protocol's, or volumes without signal)",
    "no_brain": "the b0's foreground is smaller than a brain (a phantom, or nothing in the field of view)",
    "not_dwi": "the image is not a 4D diffusion series",
}


class DwiError(Exception):
    """Base class for every failure of the ``dwi`` pipeline."""


class DwiInputError(DwiError):
    """The input cannot give a tensor: not retryable, the same file fails the same way."""

    def __init__(self, reason: str, message: str):
        if reason not in REFUSALS:
            raise ValueError(f"unknown refusal {reason!r}")
        self.reason = reason
        super().__init__(f"[{reason}] {message}")


class DwiProcessingError(DwiError):
    """A processing stage gave an implausible result (an empty brain mask, a diverged registration)."""


class DwiOutputError(DwiError):
    """The derivatives folder cannot take these outputs."""


class DwiArgumentError(DwiError, ValueError):
    """A caller's argument is invalid (BIDS label, entity, container digest, threads, shells)."""
