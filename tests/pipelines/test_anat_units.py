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
