"""Exceptions of the anatomical pipeline.

Each names the file and the problem, so a runner can record it in provenance
and mark the series failed without reading a traceback.
"""

from __future__ import annotations


class AnatError(Exception):
    """Base class for every failure of the ``anat`` pipeline."""


class AnatInputError(AnatError):
    """The input is not a usable 3D T1 (unreadable, truncated, 2D, singular affine...).

    Not retryable: the same file fails the same way. Re-convert or exclude the series.
    """


class AnatProcessingError(AnatError):
    """A processing stage gave an implausible result (e.g. registration diverged)."""


class AnatOutputError(AnatError):
    """The derivatives folder cannot take these outputs (e.g. another container made it)."""


class AnatArgumentError(AnatError, ValueError):
    """A caller's argument is invalid (BIDS label, entity, container digest, threads)."""
