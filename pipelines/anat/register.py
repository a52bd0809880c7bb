"""Registration of the subject's T1 to the MNI152 template (SimpleITK).

Three stages, each started from the previous one:

1. a translation that puts the subject's brain where the template's is, found
   from the head's top (the vertex) because field-of-view centres and centres
   of mass wander with how much neck was scanned;
2. a similarity transform (Mattes mutual information) to a "pseudo-head"
   template: nilearn's template is skull-stripped, and a skull-stripped brain
   fits a whole head almost as well as it fits the brain (we saw a second
   optimum with the brain mapped onto the scalp, 30-90 % larger in volume). Around the
   cranial vault (where the layers are regular) we paint a dark band (CSF and
   bone) and a bright band (scalp) outside the brain mask, which removes that
   optimum; with those bands the result agrees with the unbanded optimum, where
   that is found, within 1-2 % of volume;
3. a local affine refinement of the similarity against the same image.

There is no deformable stage: a demons warp moved the priors by a few
millimetres on our test T1s but made the volumes less stable under a simulated
scanner change (CSF changed by 20 % on one T1), so the priors are placed by
the affine alone and the EM and MRF steps adapt them to the subject's intensities.

The result maps subject (native) points to template points, which is what
resampling the template's priors onto the subject's grid needs.
Random metric sampling uses a fixed seed and the registration runs on one
thread (ITK's multi-threaded sampled metric gave different transforms from run
to run), so the same input gives the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from pipelines.anat.errors import AnatProcessingError
from pipelines.anat.template import downsample

if TYPE_CHECKING:
    from pipelines.anat.parameters import AnatParameters

#: Vertex (top of the head) to brain-mask top, in mm: scalp plus skull plus CSF.
SCALP_SKULL_MM = 8.0
#: Starting linear scale (template -> subject): the MNI152 brain is larger than most adults'.
INITIAL_SCALE = 0.9
#: Learning rate (about mm of voxel shift per step) of the affine refinement.
AFFINE_STEP = 0.25
#: Largest relative volume change the affine refinement may make to the similarity.
MAX_AFFINE_VOLUME_CHANGE = 0.15


@dataclass(frozen=True)
class Registration:
    """Transforms between the subject's world space and the template's."""

    affine: sitk.AffineTransform  # template point -> subject point
    to_template: sitk.Transform   # subject point -> template point
    metric: float                 # final Mattes MI of the affine stage (lower is better)


def _world_points(mask: np.ndarray, image: sitk.Image) -> np.ndarray:
    """World (LPS) coordinates of the voxels where ``mask`` (sitk array order) is set."""
    idx = np.argwhere(mask)[:, ::-1].astype(float)  # (k, j, i) -> (i, j, k)
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return idx @ direction.T + np.array(image.GetOrigin())


def initial_translation(
    subject_head: sitk.Image, template_mask: sitk.Image
) -> sitk.TranslationTransform:
    """Translation (template -> subject) from the head's vertex and left-right/front-back centre."""
    head = sitk.GetArrayViewFromImage(subject_head) > 0
    brain = sitk.GetArrayViewFromImage(template_mask) > 0.5
    head_pts = _world_points(head, subject_head)
    brain_pts = _world_points(brain, template_mask)
    top_head = head_pts[:, 2].max()
    top_brain = brain_pts[:, 2].max()
    brain_height = top_brain - brain_pts[:, 2].min()
    # Centre the head's upper part (the cranium) on the template brain in x and y.
    cranium = head_pts[head_pts[:, 2] > top_head - 0.6 * brain_height]
    shift = np.empty(3)
    shift[:2] = cranium[:, :2].mean(axis=0) - brain_pts[:, :2].mean(axis=0)
    shift[2] = (top_head - SCALP_SKULL_MM) - top_brain
    return sitk.TranslationTransform(3, tuple(float(s) for s in shift))


def _mattes(seed: int, sampling: float, fixed_mask: sitk.Image,
            learning_rate: float = 2.0) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    return reg


def similarity_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    initial: sitk.Transform,
    *,
    seed: int,
    sampling: float,
) -> sitk.Similarity3DTransform:
    """Similarity (7 parameters) registration, template ``fixed`` -> subject ``moving``."""
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(_centroid(fixed_mask))
    similarity.SetTranslation(initial.GetOffset())
    similarity.SetScale(INITIAL_SCALE)
    reg = _mattes(seed, sampling, fixed_mask)
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([6.0, 3.0, 1.0])
    reg.SetInitialTransform(similarity, inPlace=True)
    reg.Execute(fixed, moving)
    return similarity


def affine_refine(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    similarity: sitk.Similarity3DTransform,
    *,
    seed: int,
    sampling: float,
) -> tuple[sitk.AffineTransform, float]:
    """Local affine refinement of ``similarity`` (full resolution, small steps).

    A free multi-resolution affine stage sometimes walked from the right
    similarity optimum to one 30 % larger that mutual information scores
    slightly better (brain stretched onto the scalp below the vault, on a
    low-contrast 2 mm T1); small steps from the similarity keep the search local.
    """
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    reg = _mattes(seed, sampling, fixed_mask, learning_rate=AFFINE_STEP)
    reg.SetShrinkFactorsPerLevel([1])
    reg.SetSmoothingSigmasPerLevel([0.0])
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, moving)
    return affine, float(reg.GetMetricValue())


def _centroid(mask: sitk.Image) -> tuple[float, float, float]:
    pts = _world_points(sitk.GetArrayViewFromImage(mask) > 0.5, mask)
    return tuple(float(v) for v in pts.mean(axis=0))


def _check_scale(similarity: sitk.Similarity3DTransform, affine: sitk.AffineTransform) -> None:
    # Heads differ from the template by tens of percent, not by factors, and a
    # local refinement should not change the volume much.
    sim = similarity.GetScale() ** 3
    det = float(np.linalg.det(np.array(affine.GetMatrix()).reshape(3, 3)))
    if not 0.35 < sim < 2.5:
        raise AnatProcessingError(
            f"registration to the template diverged (volume scale {sim:.3g}); "
            "is the image a whole-head T1?"
        )
    if abs(det / sim - 1.0) > MAX_AFFINE_VOLUME_CHANGE:
        raise AnatProcessingError(
            f"affine refinement changed the brain volume by {100 * (det / sim - 1):+.0f} % "
            f"from the similarity stage (limit {100 * MAX_AFFINE_VOLUME_CHANGE:.0f} %): "
            "registration is unreliable for this image"
        )


def pseudo_head(
    template_t1: sitk.Image,
    template_mask: sitk.Image,
    *,
    spacing_mm: float,
    dark_mm: float,
    bright_mm: float,
    vault_above_mm: float,
) -> tuple[sitk.Image, sitk.Image]:
    """The template with skull and scalp bands painted on, and the metric mask.

    Parameters
    ----------
    template_t1, template_mask : SimpleITK.Image
        Skull-stripped template (intensities in [0, 1]) and its brain mask.
    spacing_mm : float
        Grid spacing of the returned images.
    dark_mm, bright_mm : float
        Outer edges of the dark (CSF and bone) and bright (scalp) bands, as
        distances from the brain mask.
    vault_above_mm : float
        Bands are painted only above this template z (the cranial vault); below,
        face, neck and temporal muscle break the pattern.

    Returns
    -------
    (image, mask)
        Float32 image and uint8 metric mask (the brain plus 4 mm everywhere,
        plus the bands over the vault) on a ``spacing_mm`` grid.
    """
    fixed = downsample(template_t1, spacing_mm)
    brain = sitk.Resample(template_mask, fixed, sitk.Transform(), sitk.sitkLinear, 0.0) > 0.5
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        brain, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    z = _world_points(np.ones(dist.shape, bool), fixed)[:, 2].reshape(dist.shape)
    vault = z > vault_above_mm
    image = sitk.GetArrayFromImage(fixed)
    image[(dist > 0) & (dist <= dark_mm) & vault] = 0.05
    image[(dist > dark_mm) & (dist <= bright_mm) & vault] = 0.7
    metric_mask = (dist <= 4.0) | ((dist <= bright_mm) & vault)
    out, mask = sitk.GetImageFromArray(image), sitk.GetImageFromArray(metric_mask.astype(np.uint8))
    out.CopyInformation(fixed)
    mask.CopyInformation(fixed)
    return out, mask


def register(
    subject: sitk.Image,
    subject_head: sitk.Image,
    template_t1: sitk.Image,
    template_mask: sitk.Image,
    params: "AnatParameters",
) -> Registration:
    """Register the bias-corrected subject T1 to the template; see the module docstring."""
    fixed, fixed_mask = pseudo_head(
        template_t1, template_mask, spacing_mm=params.registration_spacing_mm,
        dark_mm=params.shell_dark_mm, bright_mm=params.shell_bright_mm,
        vault_above_mm=params.shell_above_mm,
    )
    moving = downsample(subject, params.registration_spacing_mm)
    start = initial_translation(subject_head, template_mask)
    similarity = similarity_register(fixed, moving, fixed_mask, start,
                                     seed=params.registration_seed,
                                     sampling=params.registration_sampling)
    affine, metric = affine_refine(fixed, moving, fixed_mask, similarity,
                                   seed=params.registration_seed,
                                   sampling=params.registration_sampling)
    _check_scale(similarity, affine)
    return Registration(affine=affine, to_template=affine.GetInverse(), metric=metric)
