"""Built-in anatomical pipeline ``anat``: N4, MNI152 registration, GM/WM/CSF, volumes.

Call :func:`run_anat` (or ``python -m pipelines.anat --help``) on one T1w NIfTI;
it writes a BIDS derivatives dataset and returns an :class:`AnatResult`. Every
input needed ships with the installed packages (the MNI152 2009a template and
tissue maps come from nilearn), so nothing is downloaded at run time.

Importing the package is cheap (name, version, exceptions); the imaging stack
(SimpleITK, nibabel, matplotlib) loads on first use of ``run_anat`` and friends,
so pipeline registries can read ``NAME``/``VERSION`` without it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pipelines.anat.errors import (
    AnatArgumentError, AnatError, AnatInputError, AnatOutputError, AnatProcessingError,
)

NAME = "anat"
# 0.1.1: sidecars the official BIDS validator accepts (SoftwareVersions a string, SkullStripped on
# every T1w, BIDS 1.10.0, a README); the images and measures are those of 0.1.0.
# 0.1.2: the head check (QC.head_check: template correlation, tissue order, scalp margin) in the
# measures sidecar, and a figure without the face (only voxels within 4 mm of the brain mask); the
# NIfTI images and the measures are those of 0.1.1.
VERSION = "0.1.2"

_LAZY = {
    "run_anat": "pipelines.anat.run",
    "AnatResult": "pipelines.anat.run",
    "AnatParameters": "pipelines.anat.parameters",
    "MEASURES": "pipelines.anat.process",
}

__all__ = [
    "NAME", "VERSION", "MEASURES", "AnatParameters", "AnatResult", "run_anat",
    "AnatError", "AnatInputError", "AnatArgumentError", "AnatProcessingError", "AnatOutputError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
