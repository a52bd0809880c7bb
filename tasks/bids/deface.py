"""Defacing: head images leave the restricted stores without a face.

Every image of the ``anat`` datatype that the BIDS stage converts (T1w, T2w,
FLAIR, ...) gets a defaced copy in its own BIDS derivative,
``derivatives/deface-<version>/sub-*/ses-*/anat/<stem>_desc-defaced_<suffix>.nii.gz``,
with a sidecar that names its source and holds the verification. The raw
``bids/`` image keeps the face and stays restricted, or is replaced by the
defaced one once all three checks below have passed, as the trial file decides
(``deidentification.defacing``).

The face mask is pydeface's (``facemask.nii.gz`` on its whole-head template
``mean_reg2mean.nii.gz``; pydeface 2.1.0, MIT). pydeface itself cannot run here:
it calls FSL's flirt, which no package installs, and it pins numpy>=2 against
neuroHarmonize's numpy<2. So ``make setup`` takes only its two data files out of
the wheel (sha256 checked, :func:`install_template`), and the registration
flirt would do (12 degrees of freedom, mutual information) is SimpleITK's:
a translation from the head's vertex and upper-head centre (field-of-view
centres and centres of mass wander with how much neck was scanned), a
similarity, then an affine, on 3 mm copies of both images. It takes 3-6 s
on the real T1s.

Verification, on the file as written (read back) and independent of the
registration that placed the mask:

1. the face region holds nothing above the noise ceiling (the 99th percentile
   of the eight corner blocks of the original: air) -- this catches a wrong
   scaling or a write that did not happen;
2. a second registration, of the template to the *defaced* image and started
   from its centre of mass instead of the vertex, places the face mask again;
   the share of that region (eroded by :data:`ERODE_MM`) above the noise ceiling
   is the residual face and must stay under :data:`RESIDUAL_FACE_LIMIT`;
3. the brain is untouched: once a pipeline has made a brain mask from the image
   (anat, for T1w), :func:`verify_brain_untouched` counts the brain-mask voxels
   the face mask covers, which must be 0. Images no pipeline makes a brain mask
   for (T2w, FLAIR ...) have ``BrainVoxelsChanged`` null: checks 1 and 2 only.

A defacing that fails 1 or 2 is not written; one that fails 3 is withdrawn (its
record moves to ``qc/deface/``). Both are audited as ``deface_failed``, and the
original stays in ``bids/``, restricted.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import posixpath
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.bids import BIDS_VERSION
from data_contracts.trial import TrialConfig
from pipelines.anat.io import from_sitk, to_sitk
from pipelines.anat.register import _world_points as world_points  # anat's own; renaming it would rebuild the image
from pipelines.anat.template import downsample
from tasks.bids.dataset import write_if_changed
from tasks.errors import TRANSIENT_RETRIES, CorelabError
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake
from tasks.lake.versions import corelab_version

log = logging.getLogger("corelab.deface")

VERSION = "0.1.0"
ROOT = f"derivatives/deface-{VERSION}"
#: The wheel the face template comes from, and its sha256 (checked before anything is taken out of it).
TEMPLATE_WHEEL = "pydeface-2.1.0-py3-none-any.whl"
TEMPLATE_WHEEL_SHA256 = "957aac1daaedd437a4191d450c4b2829e052351e33272b79ae978c9703edc99e"
TEMPLATE_FILES = ("mean_reg2mean.nii.gz", "facemask.nii.gz")
#: Registration grid (mm): both images are smoothed and resampled to it.
GRID_MM = 3.0
#: The second registration's face region is eroded by this much before the residual is measured.
ERODE_MM = 3.0
#: Largest share of the (eroded) face region that may stay above the noise ceiling.
RESIDUAL_FACE_LIMIT = 0.02
#: Below this share of face-region voxels above noise before defacing, there is no face in the field of view.
FACE_PRESENT_SHARE = 0.05


METHOD = "pydeface 2.1.0 face mask on its template, registered to the image by SimpleITK (affine, Mattes MI)"


class DefaceError(CorelabError, RuntimeError):
    """Defacing could not be verified: the defaced image is withheld."""

    code = "deface_failed"


class DefaceUnavailable(CorelabError, RuntimeError):
    """The face template is not installed on this worker: nothing was judged."""

    code = "deface_template_missing"


# -- the template ---------------------------------------------------------------

def template_dir() -> Path:
    """Where :func:`install_template` puts the template (``CORELAB_FACE_TEMPLATE`` overrides)."""
    env = os.environ.get("CORELAB_FACE_TEMPLATE")
    return Path(env) if env else Path(sys.prefix) / "share" / "corelab" / "pydeface-2.1.0"


def template_files() -> tuple[Path, Path]:
    folder = template_dir()
    paths = tuple(folder / name for name in TEMPLATE_FILES)
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DefaceUnavailable(f"face template {', '.join(missing)} not found in {folder}: run make setup")
    return paths  # type: ignore[return-value]


def install_template(wheel: Path, dest: Path | None = None) -> Path:
    """Take pydeface's template and face mask out of its wheel (after checking the wheel's sha256)."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != TEMPLATE_WHEEL_SHA256:
        raise DefaceUnavailable(f"{wheel.name}: sha256 {digest} is not the pinned {TEMPLATE_WHEEL_SHA256}")
    dest = dest or template_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in TEMPLATE_FILES:
            (dest / name).write_bytes(z.read(f"pydeface/data/{name}"))
    return dest


# -- registration -----------------------------------------------------------------

def _head_points(image: sitk.Image) -> np.ndarray:
    """World (LPS) points of the largest Otsu foreground component."""
    mask = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.OtsuThreshold(image, 0, 1))) == 1
    return world_points(sitk.GetArrayFromImage(mask) > 0, image)


def _start(subject: sitk.Image, template: sitk.Image, how: str) -> sitk.Similarity3DTransform:
    """Starting transform (subject point -> template point): ``vertex`` or ``moments``."""
    sim = sitk.Similarity3DTransform()
    if how == "moments":
        init = sitk.CenteredTransformInitializer(subject, template, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        sim.SetCenter(init.GetCenter())
        sim.SetTranslation(init.GetTranslation())
        return sim
    ps, pt = _head_points(subject), _head_points(template)
    ps, pt = ps[ps[:, 2] > ps[:, 2].max() - 100], pt[pt[:, 2] > pt[:, 2].max() - 100]  # the top 10 cm (LPS: +z up)
    sim.SetCenter(tuple(float(v) for v in np.r_[ps[:, :2].mean(0), ps[:, 2].max() - 60]))
    sim.SetTranslation(tuple(float(v) for v in np.r_[pt[:, :2].mean(0) - ps[:, :2].mean(0),
                                                      pt[:, 2].max() - ps[:, 2].max()]))
    return sim


def _method(learning_rate: float) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, 1)  # fixed seed, one work unit: the same input gives the same mask
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learning_rate, 1e-3, 200, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    # One thread is not enough: with more than one work unit (the default is one per core) the
    # same images gave 5 different transforms in 6 calls on 2 cores; with one, the same every time.
    reg.SetNumberOfThreads(1)
    reg.SetNumberOfWorkUnits(1)
    return reg


def register_template(subject: sitk.Image, template: sitk.Image, start: str = "vertex") -> sitk.AffineTransform:
    """Affine transform mapping subject points to template points (what resampling the mask needs)."""
    fixed, moving = downsample(subject, GRID_MM), downsample(template, GRID_MM)
    sim = _start(fixed, moving, start)
    reg = _method(2.0)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([4.0, 2.0])
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    reg.SetInitialTransform(sim, inPlace=True)
    reg.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(sim.GetCenter())
    affine.SetMatrix(sim.GetMatrix())
    affine.SetTranslation(sim.GetTranslation())
    reg = _method(0.5)
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, moving)
    return affine


def face_region(subject: sitk.Image, facemask: sitk.Image, transform: sitk.Transform,
                erode_mm: float = 0.0) -> np.ndarray:
    """The template's face on the subject's grid, in nibabel's (i, j, k) order."""
    keep = sitk.Resample(facemask, subject, transform, sitk.sitkLinear, 1.0, sitk.sitkFloat32)
    face = sitk.Cast(keep < 0.5, sitk.sitkUInt8)
    if erode_mm:
        radius = [max(1, int(round(erode_mm / s))) for s in subject.GetSpacing()]
        face = sitk.BinaryErode(face, radius)
    return from_sitk(face).astype(bool)


def noise_ceiling(volume: np.ndarray) -> float:
    """99th percentile of the eight corner blocks (a tenth of each axis): air in a head scan."""
    blocks = []
    for corner in np.ndindex(2, 2, 2):
        sl = tuple(slice(0, max(1, n // 10)) if c == 0 else slice(n - max(1, n // 10), n)
                   for c, n in zip(corner, volume.shape[:3]))
        blocks.append(volume[sl].ravel())
    corners = np.concatenate(blocks)
    corners = corners[np.isfinite(corners)]
    return float(np.percentile(corners, 99)) if corners.size else 0.0


# -- defacing one image ---------------------------------------------------------------

@dataclass
class Defaced:
    """A defaced image (not yet written) and what was measured while making it."""

    image: nib.Nifti1Image
    face: np.ndarray                       # (i, j, k) face region of the first registration
    report: dict[str, Any] = field(default_factory=dict)


def _first_volume(img: nib.Nifti1Image) -> sitk.Image:
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    data = np.nan_to_num(data if data.ndim == 3 else data[..., 0], nan=0.0, posinf=0.0, neginf=0.0)
    return to_sitk(nib.Nifti1Image(data, img.affine))


def _zeroed(img: nib.Nifti1Image, face: np.ndarray) -> nib.Nifti1Image:
    """The image with the face voxels at 0, in its own data type and scaling."""
    proxy = img.dataobj
    if nib.is_proxy(proxy):  # as loaded: keep the stored integers and their scaling
        raw, slope, inter = np.array(proxy.get_unscaled()), float(proxy.slope), float(proxy.inter)
    else:
        raw, slope, inter = np.array(proxy), 1.0, 0.0
    zero = (0.0 - inter) / slope
    stored = np.asarray(zero).astype(raw.dtype)
    if float(stored) != zero:  # 0 has no stored value in this type and scaling: store floats
        raw, slope, inter = np.asanyarray(img.dataobj, dtype=np.float32), 1.0, 0.0
        stored = np.float32(0.0)
    mask = face if raw.ndim == 3 else face[..., None]
    raw = np.where(mask, stored, raw)
    header = img.header.copy()
    header.set_data_dtype(raw.dtype)
    out = nib.Nifti1Image(raw, img.affine, header)
    out.header.set_slope_inter(slope, inter)
    return out


def _template() -> tuple[sitk.Image, sitk.Image]:
    template_path, mask_path = template_files()
    return _read_template(str(template_path), str(mask_path))


@functools.lru_cache(maxsize=2)
def _read_template(template_path: str, mask_path: str) -> tuple[sitk.Image, sitk.Image]:
    return sitk.ReadImage(template_path, sitk.sitkFloat32), sitk.ReadImage(mask_path, sitk.sitkFloat32)


def deface(img: nib.Nifti1Image) -> Defaced:
    """Deface one image and verify the result as it will be read back (see the module docstring).

    Raises
    ------
    DefaceError
        A face is left (residual above the limit), the written voxels are not zero, or the
        template cannot be registered to the image.
    """
    template, facemask = _template()
    if img.ndim not in (3, 4):
        raise DefaceError(f"a {img.ndim}D image cannot be defaced (3D or 4D only)")
    volume = _first_volume(img)
    first = sitk.GetArrayFromImage(volume)
    if first.size == 0 or float(first.max()) == float(first.min()):
        raise DefaceError("the image is constant: there is no head to register")
    try:
        face = face_region(volume, facemask, register_template(volume, template, "vertex"))
        out = _zeroed(img, face)
        return Defaced(out, face, verify_defaced(img, out, face))
    except DefaceError:
        raise
    except (RuntimeError, ValueError) as exc:  # SimpleITK: an image too small or too flat to register
        detail = re.sub(r"\(0x[0-9a-f]+\)", "", str(exc).strip().splitlines()[-1])
        raise DefaceError(f"the face template could not be registered to the image: {detail}") from exc


def verify_defaced(original: nib.Nifti1Image, defaced: nib.Nifti1Image, face: np.ndarray) -> dict[str, Any]:
    """Checks 1 and 2 of the module docstring on ``defaced`` as it will be read back; the report.

    Raises
    ------
    DefaceError
        Voxels of ``face`` are not zero, or a face is found again on the defaced image.
    """
    template, facemask = _template()
    before = np.asanyarray(original.dataobj, dtype=np.float32)
    before = np.nan_to_num(before if before.ndim == 3 else before[..., 0])
    noise = noise_ceiling(before)
    present = float((before[face] > noise).mean()) if face.any() else 0.0
    back = nib.Nifti1Image.from_bytes(defaced.to_bytes())
    written = np.asanyarray(back.dataobj, dtype=np.float32)
    left = int((written[face] != 0).sum())  # a 3D mask on a 4D image takes every volume
    first = written if written.ndim == 3 else written[..., 0]
    volume = _first_volume(back)
    again = face_region(volume, facemask, register_template(volume, template, "moments"), ERODE_MM)
    residual = float((first[again] > noise).mean()) if again.any() else 0.0
    report = {
        "Method": METHOD,
        "FaceVoxels": int(face.sum()),
        "FaceShareAboveNoiseBefore": round(present, 4),
        "FacePresent": present >= FACE_PRESENT_SHARE,
        "NoiseCeiling": round(noise, 3),
        "FaceVoxelsNonZeroAfter": left,
        "ResidualFaceShare": round(residual, 4),
        "ResidualFaceLimit": RESIDUAL_FACE_LIMIT,
        "BrainVoxelsChanged": None,  # set once the anat pipeline's brain mask exists
    }
    if left:
        raise DefaceError(f"{left} voxels of the face region are not zero in the written image")
    if residual > RESIDUAL_FACE_LIMIT:
        raise DefaceError(f"{residual:.1%} of the face region (placed again on the defaced image) is above the "
                          f"noise ceiling {noise:.4g}, limit {RESIDUAL_FACE_LIMIT:.0%}: a face may be left")
    return report


# -- the derivative in the lake -------------------------------------------------------------

def _gz(image: nib.Nifti1Image) -> bytes:
    return gzip.compress(image.to_bytes(), mtime=0)  # mtime 0: the same image gives the same bytes


def _nifti(rel: str, data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data) if rel.endswith(".gz") else data)


def derivative_paths(raw: str) -> tuple[str, str, str]:
    """Lake paths of the defaced image, its sidecar and the face mask for a ``bids/`` image."""
    rel = raw.removeprefix("bids/")
    folder, name = posixpath.split(rel)
    prefix, suffix = name.removesuffix(".nii.gz").rsplit("_", 1)
    image = f"{ROOT}/{folder}/{prefix}_desc-defaced_{suffix}.nii.gz"
    return image, image.removesuffix(".nii.gz") + ".json", f"{ROOT}/{folder}/{prefix}_desc-face{suffix}_mask.nii.gz"


def write_dataset_description(lake: Lake) -> None:
    rel = f"{ROOT}/dataset_description.json"
    desc = {
        "Name": f"deface {VERSION}: head images without a face",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "corelab-deface", "Version": VERSION,
                         "Description": f"corelab {corelab_version()}: {METHOD}"}],
    }
    readme = (f"Defaced copies of the raw dataset's anat images (corelab deface {VERSION}).\n\n{METHOD}.\n"
              "Each image's sidecar holds the verification (Defacing) and names its face mask (FaceMask).\n")
    write_if_changed(lake, rel, json.dumps(desc, indent=2).encode())
    write_if_changed(lake, f"{ROOT}/README", readme.encode())


def withdrawn_path(raw: str) -> str:
    """Where the record of a defacing the brain check withdrew is kept (outside the BIDS derivative)."""
    return "qc/deface/" + derivative_paths(raw)[1].removeprefix(f"{ROOT}/")


def _recorded(lake: Lake, raw: str, raw_sha: str) -> dict[str, Any] | None:
    """The sidecar (or withdrawn record) of this image's defacing, when made from these very bytes."""
    for rel in (derivative_paths(raw)[1], withdrawn_path(raw)):
        if lake.exists(rel):
            record = json.loads(lake.read_text(rel))
            if raw_sha in (record.get("SourceSha256"), record.get("DefacedSha256")):
                return record
    return None


def deface_image(lake: Lake, trial: TrialConfig, raw: str) -> dict[str, Any] | None:
    """Deface one ``bids/`` image into the derivative (nothing is written when it cannot be verified).

    Returns the defacing report, or None when the defacing failed (audited as ``deface_failed``)
    or was withdrawn by the brain check. Idempotent: an image defaced from the same bytes (or
    already replaced by its defaced copy) is not defaced again.
    """
    raw_bytes = lake.read_bytes(raw)
    raw_sha = hashlib.sha256(raw_bytes).hexdigest()
    image_rel, sidecar_rel, mask_rel = derivative_paths(raw)
    recorded = _recorded(lake, raw, raw_sha)
    if recorded is not None:  # done before; one the brain check withdrew stays withdrawn
        return None if recorded.get("Withdrawn") else recorded["Defacing"]
    raw_sidecar = raw.removesuffix(".nii.gz") + ".json"
    try:
        original = _nifti(raw, raw_bytes)
        sidecar = json.loads(lake.read_text(raw_sidecar)) if lake.exists(raw_sidecar) else {}
        result = deface(original)
    except (DefaceError, ValueError, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as exc:
        log.warning("%s: defacing failed, nothing written (the original stays restricted): %s", raw, exc)
        append_event(lake, "deface_failed", image=raw, reason=str(exc), code=DefaceError.code)
        return None
    source = f"bids:raw:{raw.removeprefix('bids/')}"
    defaced = _gz(result.image)
    sidecar.update({"Description": "the source image with the face set to 0", "Sources": [source],
                    "SourceSha256": raw_sha, "DefacedSha256": hashlib.sha256(defaced).hexdigest(),
                    "SkullStripped": False, "Defacing": result.report,
                    "FaceMask": mask_rel.removeprefix(f"{ROOT}/")})
    mask = nib.Nifti1Image(result.face.astype(np.uint8), original.affine)
    mask.header.set_xyzt_units(*original.header.get_xyzt_units())
    write_dataset_description(lake)
    lake.write_bytes(mask_rel, _gz(mask))
    lake.write_bytes(mask_rel.removesuffix(".nii.gz") + ".json",
                     json.dumps({"Type": "Face", "Description": "voxels set to 0 in the defaced image",
                                 "SpatialReference": "orig", "Sources": [source]}, indent=2).encode())
    lake.write_bytes(image_rel, defaced)
    lake.write_bytes(sidecar_rel, json.dumps(sidecar, indent=2).encode())
    append_event(lake, "image_defaced", image=raw, defaced=image_rel,
                 residual_face_share=result.report["ResidualFaceShare"])
    log.info("%s <- %s (residual face %.2f %%)", image_rel, raw, 100 * result.report["ResidualFaceShare"])
    return result.report


def deface_study(lake: Lake, trial: TrialConfig, images: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    """Deface every anat image of a study (by series UID); reports, None for a failed one."""
    if not trial.deidentification.defacing.enabled:
        return {}
    return {uid: deface_image(lake, trial, rel) for uid, rel in sorted(images.items())
            if posixpath.basename(posixpath.dirname(rel)) == "anat"}


@task(name="deface-study", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def deface_study_task(lake: Lake, trial: TrialConfig, images: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    return deface_study(lake, trial, images)


def verify_brain_untouched(lake: Lake, trial: TrialConfig, raw: str, brain_mask: str) -> int | None:
    """Check 3: voxels of a pipeline's brain mask that the face mask covers (must be 0).

    The count goes into the defaced image's sidecar. When it is not 0 the defaced copy and its
    mask are withdrawn (the record moves to :func:`withdrawn_path`, audited as ``deface_failed``).
    When it is 0 and the trial file says ``replaced``, the ``bids/`` image becomes the defaced
    copy. None when there is nothing to check (not defaced, no brain mask, checked before).
    """
    image_rel, sidecar_rel, mask_rel = derivative_paths(raw)
    if not all(lake.exists(rel) for rel in (image_rel, sidecar_rel, mask_rel, brain_mask)):
        return None
    sidecar = json.loads(lake.read_text(sidecar_rel))
    if sidecar["Defacing"].get("BrainVoxelsChanged") is not None:
        return None
    face, brain = _nifti(mask_rel, lake.read_bytes(mask_rel)), _nifti(brain_mask, lake.read_bytes(brain_mask))
    if face.shape[:3] != brain.shape[:3] or not np.allclose(face.affine, brain.affine, atol=1e-3):
        from nibabel.processing import resample_from_to

        brain = resample_from_to(brain, face, order=0)  # e.g. a mask on the RAS-reoriented grid
    overlap = int(((np.asanyarray(face.dataobj) > 0) & (np.asanyarray(brain.dataobj) > 0)).sum())
    sidecar["Defacing"].update({"BrainVoxelsChanged": overlap, "BrainMask": brain_mask})
    if overlap:
        sidecar["Withdrawn"] = True
        lake.write_bytes(withdrawn_path(raw), json.dumps(sidecar, indent=2).encode())
        for rel in (image_rel, sidecar_rel, mask_rel, mask_rel.removesuffix(".nii.gz") + ".json"):
            lake.remove(rel)
        log.warning("%s: the face mask covers %d voxels of the brain mask %s; defaced copy withdrawn",
                    raw, overlap, brain_mask)
        append_event(lake, "deface_failed", image=raw, code="deface_failed",
                     reason=f"the face mask covers {overlap} voxels of the brain mask {brain_mask}")
        return overlap
    lake.write_bytes(sidecar_rel, json.dumps(sidecar, indent=2).encode())
    if trial.deidentification.defacing.original == "replaced":
        lake.write_bytes(raw, lake.read_bytes(image_rel))
        append_event(lake, "raw_image_replaced", image=raw, defaced=image_rel)
    return overlap


@task(name="verify-brain-untouched", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def verify_brain_untouched_task(lake: Lake, trial: TrialConfig, raw: str, brain_mask: str) -> int | None:
    return verify_brain_untouched(lake, trial, raw, brain_mask)


if __name__ == "__main__":  # make setup: python -m tasks.bids.deface <wheel>
    print(install_template(Path(sys.argv[1])))
