"""Reading, checking and converting the input T1.

Every check that can reject a file lives here, before anything is written, so
a bad input never leaves a half-made derivative behind.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipelines.anat.errors import AnatInputError

#: A T1 must cover at least this many millimetres and voxels along every axis;
#: a localizer (1-3 slices) or a thin slab cannot be segmented as a head.
MIN_EXTENT_MM = 80.0
MIN_VOXELS_PER_AXIS = 16
#: Voxels coarser than this cannot resolve grey matter.
MAX_VOXEL_MM = 3.5
#: Above this condition number the voxel-to-world matrix is treated as singular.
MAX_AFFINE_CONDITION = 1e6

# ITK works in LPS, NIfTI world space is RAS: flip x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_t1(path: str | Path) -> nib.Nifti1Image:
    """Load and check a T1 NIfTI, reoriented to the closest canonical (RAS+) axes.

    Parameters
    ----------
    path : str or Path
        A ``.nii`` or ``.nii.gz`` holding one 3D volume (a 4D file with one
        volume is accepted).

    Returns
    -------
    nibabel.Nifti1Image
        float32 data on RAS+ axes; the affine is the input's, permuted.

    Raises
    ------
    AnatInputError
        When the file is missing, unreadable, truncated, not 3D, too thin to be
        a head (a 2D localizer), too coarse, has a singular or non-finite
        affine, or holds no signal.
    """
    path = Path(path)
    if not path.is_file():
        raise AnatInputError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a bad header
        raise AnatInputError(f"{path}: not a readable NIfTI ({_one_line(exc)})") from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise AnatInputError(f"{path}: is {type(img).__name__}, anat needs NIfTI")
    _check_affine(path, img.affine)
    _check_geometry(path, img.shape, img.header.get_zooms())
    data = _read_data(path, img)
    if data.ndim == 4:
        data = data[..., 0]
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if float(data.max()) <= float(data.min()):
        raise AnatInputError(f"{path}: image is constant ({data.min():g}); no signal to segment")
    out = nib.Nifti1Image(data.astype(np.float32), img.affine)
    out.header.set_xyzt_units("mm")
    return nib.as_closest_canonical(out)


def _read_data(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    # A truncated file has a valid header: the shortfall shows only on reading.
    try:
        return np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise AnatInputError(
            f"{path}: truncated or corrupt voxel data ({type(exc).__name__}: {_one_line(exc)})"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.isfinite(affine).all():
        raise AnatInputError(f"{path}: affine holds NaN or infinite values")
    lin = affine[:3, :3]
    cond = np.linalg.cond(lin) if np.abs(lin).sum() > 0 else np.inf
    if not np.isfinite(cond) or cond > MAX_AFFINE_CONDITION:
        raise AnatInputError(
            f"{path}: voxel-to-world affine is singular (non-invertible, condition "
            f"{cond:.3g}); fix the sform/qform of the conversion"
        )


def _check_geometry(path: Path, shape: tuple[int, ...], zooms: tuple[float, ...]) -> None:
    if len(shape) == 4 and shape[3] != 1:
        raise AnatInputError(f"{path}: has {shape[3]} volumes; anat expects one 3D T1")
    if len(shape) not in (3, 4):
        raise AnatInputError(f"{path}: is {len(shape)}D (shape {shape}); anat expects a 3D T1")
    shape3, zooms3 = np.array(shape[:3]), np.array(zooms[:3], dtype=float)
    extent = shape3 * zooms3
    if (shape3 < MIN_VOXELS_PER_AXIS).any() or (extent < MIN_EXTENT_MM).any():
        raise AnatInputError(
            f"{path}: shape {tuple(int(s) for s in shape3)} covers "
            f"{' x '.join(f'{e:.0f}' for e in extent)} mm: a 2D localizer or thin slab, "
            "not a 3D T1 of the head"
        )
    if (zooms3 <= 0).any() or (zooms3 > MAX_VOXEL_MM).any():
        raise AnatInputError(
            f"{path}: voxel size {tuple(round(float(z), 3) for z in zooms3)} mm; "
            f"anat needs voxels between 0 and {MAX_VOXEL_MM} mm"
        )


def to_sitk(img: nib.Nifti1Image) -> sitk.Image:
    """A SimpleITK image with the same voxels and world geometry as ``img``.

    ITK stores index order (i, j, k) as array order (k, j, i), world space as LPS
    and the direction as unit column vectors; this does those three changes.
    """
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    out = sitk.GetImageFromArray(np.asarray(img.dataobj).transpose(2, 1, 0).copy())
    out.SetSpacing(tuple(float(z) for z in zooms))
    out.SetOrigin(tuple(float(v) for v in _RAS_TO_LPS @ img.affine[:3, 3]))
    direction = _RAS_TO_LPS @ img.affine[:3, :3] / zooms
    out.SetDirection(tuple(float(v) for v in direction.ravel()))
    return out


def from_sitk(image: sitk.Image) -> np.ndarray:
    """Voxel array of a SimpleITK image in NIfTI (i, j, k) order."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def nifti_like(data: np.ndarray, ref: nib.Nifti1Image, dtype: type) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` on the grid of ``ref`` (sform and qform set)."""
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), ref.affine)
    out.set_sform(ref.affine, code=1)
    out.set_qform(ref.affine, code=1)
    out.header.set_xyzt_units("mm")
    return out
