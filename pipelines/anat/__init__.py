"""Built-in anatomical pipeline ``anat``: N4, MNI152 registration, GM/WM/CSF, volumes.

Call :func:`run_anat` (or ``python -m pipelines.anat --help``) on one T1w NIfTI;
it writes a BIDS derivatives dataset and returns an :class:`AnatResult`. Every
input needed ships with the installed packages (the MNI152 2009a template and
tissue maps come from nilearn), so nothing is downloaded at run time.
"""

from __future__ import annotations

NAME = "anat"
VERSION = "0.1.0"

from pipelines.anat.errors import (  # noqa: E402
    AnatArgumentError, AnatError, AnatInputError, AnatOutputError, AnatProcessingError,
)
from pipelines.anat.parameters import AnatParameters  # noqa: E402
from pipelines.anat.process import MEASURES  # noqa: E402
from pipelines.anat.run import AnatResult, run_anat  # noqa: E402

__all__ = [
    "NAME", "VERSION", "MEASURES", "AnatParameters", "AnatResult", "run_anat",
    "AnatError", "AnatInputError", "AnatArgumentError", "AnatProcessingError", "AnatOutputError",
]
