"""Units of ``anat`` on phantoms with known truth (no real data needed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipelines.anat.derivatives import file_prefix, measures_tsv, output_names
from pipelines.anat.segment import segment, tissue_volumes


def _phantom(noise: float, seed: int = 3):
    """Nested spheres: WM core, GM shell, CSF rim (T1 contrast 0.8 / 0.55 / 0.2)."""
    zz, yy, xx = np.indices((48, 48, 48)) - 23.5
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    truth = np.select([r < 10, r < 15, r < 20], [2, 1, 3], 0)  # 1 GM, 2 WM, 3 CSF
    image = np.choose(truth, [0.0, 0.55, 0.8, 0.2])
    image = image + np.random.default_rng(seed).normal(0.0, noise, image.shape)
    mask = truth > 0
    # Blurred, slightly shrunk "template" priors: right place, wrong edges.
    priors = np.stack([ndimage.gaussian_filter((truth == k).astype(float), 2.0) for k in (1, 2, 3)])
    return image, mask, priors, truth


@pytest.mark.parametrize("noise", [0.02, 0.08])
def test_em_recovers_phantom_tissues(noise):
    image, mask, priors, truth = _phantom(noise)
    seg = segment(image, mask, priors, prior_weight=1.0, mrf_beta=0.5, max_iterations=50,
                  tolerance=1e-4, mrf_iterations=5)
    labels = 1 + np.argmax(seg.posteriors, axis=0)
    assert (labels[mask] == truth[mask]).mean() > 0.97
    np.testing.assert_allclose(seg.means, (0.55, 0.8, 0.2), atol=0.03)
    vols = tissue_volumes(seg.posteriors, mask, voxel_mm3=1.0)
    true_vols = [(truth == k).sum() for k in (1, 2, 3)]
    np.testing.assert_allclose(vols, true_vols, rtol=0.03)
    np.testing.assert_allclose(seg.posteriors[:, mask].sum(axis=0), 1.0, atol=1e-6)
    assert not seg.posteriors[:, ~mask].any()


def test_em_does_not_depend_on_intensity_unit():
    image, mask, priors, _ = _phantom(0.05)
    kw = dict(prior_weight=1.0, mrf_beta=0.5, max_iterations=50, tolerance=1e-4, mrf_iterations=5)
    a = segment(image, mask, priors, **kw)
    b = segment(image * 1000.0, mask, priors, **kw)
    np.testing.assert_allclose(a.posteriors, b.posteriors, atol=1e-5)


def test_bids_names_follow_entity_order():
    prefix = file_prefix("01", "base", {"run": "02", "acq": "mprage"})
    assert prefix == "sub-01_ses-base_acq-mprage_run-2"
    names = output_names(prefix, ("GM", "WM", "CSF"))
    assert names["dseg"] == "sub-01/ses-base/anat/sub-01_ses-base_acq-mprage_run-2_dseg.nii.gz"
    assert names["probseg_CSF"].endswith("_label-CSF_probseg.nii.gz")
    assert list(names)[-1] == "measures"


def test_measures_tsv_round_trips_exactly():
    values = {"TIV": 1507086.2392036915, "GM_fraction": 0.5570385904956515}
    text = measures_tsv(values, {"TIV": "mm3", "GM_fraction": "1"})
    rows = [line.split("\t") for line in text.splitlines()[1:]]
    assert {r[0]: float(r[1]) for r in rows} == values


def test_downsample_handles_anisotropic_voxels():
    import SimpleITK as sitk

    from pipelines.anat.template import downsample

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((30, 40, 40)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))  # x, y at 1 mm; z already at 2 mm
    out = downsample(image, 2.0)
    assert out.GetSpacing() == (2.0, 2.0, 2.0) and out.GetSize() == (20, 20, 30)
    # Same physical extent: the grids share their outer corner.
    corner = np.array(image.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    np.testing.assert_allclose(out.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)), corner)


def _ball(shape: tuple[int, int, int], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_scalp_margin_is_the_distance_to_air_and_ignores_the_field_of_view_faces():
    """A 10-voxel shell of head around a brain gives a 10 mm margin (1 mm voxels), also when the
    head touches a face of the field of view, where the head mask's closing strips two voxels."""
    from pipelines.anat.headcheck import EDGE_VOXELS, scalp_margin_mm

    brain = _ball((80, 80, 80), (40, 40, 40), 20)
    head = _ball((80, 80, 80), (40, 40, 40), 30)
    assert scalp_margin_mm(brain, head, (1.0, 1.0, 1.0)) == pytest.approx(10.0, abs=1.0)
    # Head and brain cut by the top of the field of view through the brain, the head as
    # bias.head_mask leaves it (two voxels gone at the face): measured to that band, it was 5 mm.
    cut_brain = _ball((80, 80, 50), (40, 40, 45), 20)
    cut_head = _ball((80, 80, 50), (40, 40, 45), 30)
    cut_head[:, :, -EDGE_VOXELS:] = False
    assert scalp_margin_mm(cut_brain, cut_head, (1.0, 1.0, 1.0)) == pytest.approx(10.0, abs=1.0)
    # Half-size voxels: the same shell is 5 mm.
    assert scalp_margin_mm(brain, head, (0.5, 0.5, 0.5)) == pytest.approx(5.0, abs=0.5)


def test_head_check_values_that_cannot_be_measured_are_none_and_json_has_no_nan():
    import json

    from pipelines.anat.headcheck import head_check

    brain = _ball((40, 40, 40), (20, 20, 20), 8)
    priors = {t: np.zeros(brain.shape) for t in ("GM", "WM", "CSF")}   # no sure voxel of any tissue
    flat = np.ones(brain.shape, np.float32)                            # no contrast to correlate
    values = head_check(flat, np.random.default_rng(0).random(brain.shape), priors, brain,
                        np.ones(brain.shape, bool), (1.0, 1.0, 1.0))    # head fills the field of view
    assert values == {"template_correlation": None, "tissue_order": None, "scalp_margin_mm": None}
    json.dumps(values, allow_nan=False)


def test_tissue_order_is_negative_when_the_contrast_is_inverted():
    from pipelines.anat.headcheck import tissue_order

    brain = np.ones((30, 30, 30), bool)
    labels = np.indices(brain.shape)[0] // 10                          # three slabs: CSF, GM, WM
    priors = {t: (labels == i).astype(float) for i, t in enumerate(("CSF", "GM", "WM"))}
    t1 = np.choose(labels, [30.0, 60.0, 100.0])
    assert tissue_order(t1, priors, brain) == pytest.approx(min(100 - 60, 60 - 30) / 100)
    assert tissue_order(130.0 - t1, priors, brain) < 0
