"""Which software made an output: corelab's own version and the versions every output records.

Every table file, de-identified DICOM, BIDS dataset and harmonization model names the
software that shaped it. They all ask here, so they all say the same.
"""

from __future__ import annotations

import functools
from importlib import metadata

# The packages whose versions shape corelab's outputs, recorded in every table file and model.
SOFTWARE = ("corelab-imaging", "pyarrow", "pydicom", "dcm2niix", "prefect", "neuroHarmonize",
            "neuroCombat", "statsmodels", "scipy", "SimpleITK", "nibabel", "pandas", "numpy")


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def corelab_version() -> str:
    """corelab's own version ("dev" when run from a checkout that is not installed)."""
    return installed_version("corelab-imaging") or "dev"


def software_versions() -> dict[str, str]:
    """Installed versions of :data:`SOFTWARE` (packages that are not installed are left out)."""
    return dict(_software())


@functools.lru_cache(maxsize=1)  # reading package metadata costs ~20 ms; it cannot change mid-run
def _software() -> tuple[tuple[str, str], ...]:
    return tuple((name, v) for name in SOFTWARE if (v := installed_version(name)) is not None)
