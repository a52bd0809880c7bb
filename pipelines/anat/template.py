"""The MNI152 2009a template and tissue priors, read from the nilearn package.

nilearn ships the ICBM 2009a nonlinear symmetric T1 template and its GM and WM
probability maps (1 mm) inside the package, so nothing is downloaded at run
time. We read those files directly (importing nilearn would cost seconds and
bring scikit-learn along) and follow nilearn's own conventions: each map is
rescaled to [0, 1] and the brain mask is the T1 template above 0.2
(``nilearn.datasets.load_mni152_brain_mask``). There is no CSF map; CSF is what
the mask holds beyond GM and WM.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipelines.anat.io import sha256_file, to_sitk

TEMPLATE_NAME = "MNI152NLin2009aSym"
_FILES = {
    "T1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: nilearn's threshold on the rescaled T1 template for its brain mask.
MASK_THRESHOLD = 0.2
#: Tissue order used for priors, posteriors and ``dseg`` labels 1..3 (fMRIPrep's order).
TISSUES = ("GM", "WM", "CSF")


@dataclass(frozen=True)
class Template:
    """Template images as SimpleITK float32 images on the 1 mm template grid."""

    t1: sitk.Image
    mask: sitk.Image
    priors: tuple[sitk.Image, sitk.Image, sitk.Image]  # in TISSUES order
    files: dict[str, str]  # file name -> sha256, for provenance


def template_dir() -> Path:
    """The folder of nilearn's bundled data, found without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed; anat needs its bundled MNI152 template")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def template_version() -> str:
    """Version of the nilearn package that provides the template files."""
    return metadata.version("nilearn")


def _scaled(path: Path) -> np.ndarray:
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    return data / data.max()


def _image_like(data: np.ndarray, ref: nib.Nifti1Image) -> sitk.Image:
    return to_sitk(nib.Nifti1Image(data.astype(np.float32), ref.affine))


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Load T1, brain mask and GM/WM/CSF priors (priors sum to the mask).

    Returns
    -------
    Template
        Priors are zero outside the mask; inside, CSF = max(0, 1 - GM - WM).
    """
    folder = template_dir()
    ref = nib.load(str(folder / _FILES["T1w"]))
    t1 = _scaled(folder / _FILES["T1w"])
    mask = (t1 > MASK_THRESHOLD).astype(np.float32)
    gm = _scaled(folder / _FILES["GM"]) * mask
    wm = _scaled(folder / _FILES["WM"]) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    return Template(
        t1=_image_like(t1, ref),
        mask=_image_like(mask, ref),
        priors=(_image_like(gm, ref), _image_like(wm, ref), _image_like(csf, ref)),
        files={name: sha256_file(folder / name) for name in _FILES.values()},
    )


def downsample(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Gaussian-smooth then resample ``image`` onto an isotropic grid over the same extent."""
    old = np.array(image.GetSpacing())
    size = np.ceil(np.array(image.GetSize()) * old / spacing_mm).astype(int)
    # Anti-aliasing: bring each axis's resolution (FWHM) to about the new spacing;
    # axes already as coarse get no smoothing (a discrete Gaussian allows variance 0).
    sigma = np.sqrt(np.maximum(spacing_mm**2 - old**2, 0.0)) / 2.355
    smooth = sitk.DiscreteGaussian(image, [float(v) for v in sigma**2], 32, 0.01, True)
    # Keep the first voxel's corner where it was, so the grids share their corner.
    origin = np.array(image.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = origin + direction @ np.full(3, spacing_mm / 2)
    return sitk.Resample(
        smooth, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
        tuple(origin), (spacing_mm,) * 3, image.GetDirection(), 0.0, sitk.sitkFloat32,
    )
