"""The dwi pipeline's stages on the Philips 12-direction DWI of ../shared/data, and on series made
wrong from it: shuffled volumes, a flipped gradient axis, planted motion, and each refusal.

The series is converted by dcm2niix exactly as corelab's BIDS stage does it (gzip-compressed
classic DICOM, Philips' scrambled instance numbers sorted by dcm2niix's private-tag rule).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from pipelines.dwi.errors import DwiInputError
from pipelines.dwi.process import compute
from tests.data import REPO
from tests.helpers import bids_validator, describe
from tests.pipelines.dwi_data import in_bids, philips_dwi

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    return philips_dwi(tmp_path_factory.mktemp("philips-dwi"))


@pytest.fixture(scope="module")
def result(series):
    return compute(series)


def _variant(series: Path, out: Path, data=None, bvals=None, bvecs=None, drop: str | None = None) -> Path:
    """A copy of ``series`` with its image, b-values or directions replaced (``drop``: a sidecar left out)."""
    img = nib.load(str(series))
    out.mkdir(parents=True, exist_ok=True)
    target = out / series.name
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data, img.affine, img.header), str(target))
    stem = series.name.removesuffix(".nii.gz")
    bval = np.loadtxt(series.with_name(stem + ".bval")) if bvals is None else bvals
    bvec = np.loadtxt(series.with_name(stem + ".bvec")) if bvecs is None else bvecs
    if drop != "bval":
        np.savetxt(out / f"{stem}.bval", bval[None], fmt="%g")
    if drop != "bvec":
        np.savetxt(out / f"{stem}.bvec", bvec, fmt="%.6f")
    return target


def _table(series: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    stem = series.name.removesuffix(".nii.gz")
    return (np.asarray(nib.load(str(series)).dataobj), np.loadtxt(series.with_name(stem + ".bval")),
            np.loadtxt(series.with_name(stem + ".bvec")))


def test_white_matter_fa_and_md_are_a_healthy_adult_brains(result):
    """Whole white matter (FA > 0.2) of a healthy adult: mean FA 0.35-0.55 and MD 0.6-0.9 um2/ms
    (Lebel et al. 2012, NeuroImage 60:340, tract means of adults at 1.5 T/3 T); CSF FA stays low."""
    m, qc = result.measures, result.qc
    assert 0.35 <= m["FA_WM"] <= 0.55 and 0.6 <= m["MD_WM"] <= 0.9, m
    assert m["AD_WM"] > m["MD_WM"] > m["RD_WM"] > 0
    assert (qc["volumes"], qc["b0_volumes"], qc["directions"], qc["shells"]) == (17, 5, 12, [1000.0])
    assert qc["fa_csf"] < 0.2 and qc["csf_voxels"] > 1000
    assert qc["gradient_flip_suspected"] is None and max(qc["gradient_flip_gain"].values()) < 0
    assert qc["dropout_slices"] == 0 and qc["tensor_residual"] < 0.05
    assert qc["motion"]["max_displacement_mm"] < 1.0


def test_the_order_of_the_volumes_does_not_change_fa(series, result, tmp_path):
    data, bval, bvec = _table(series)
    order = np.random.default_rng(3).permutation(data.shape[3])
    assert (order != np.arange(len(order))).any()
    shuffled = compute(_variant(series, tmp_path, data[..., order], bval[order], bvec[:, order]))
    brain = result.brain_mask
    assert np.array_equal(shuffled.brain_mask, brain)
    assert np.abs(shuffled.fa - result.fa)[brain].mean() < 0.005
    assert shuffled.measures["FA_WM"] == pytest.approx(result.measures["FA_WM"], abs=0.003)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_gradient_axis_with_the_wrong_sign_is_caught(series, tmp_path, axis):
    data, bval, bvec = _table(series)
    flipped = bvec.copy()
    flipped[axis] *= -1
    qc = compute(_variant(series, tmp_path, bvecs=flipped), motion=False).qc
    assert qc["gradient_flip_suspected"] == "xyz"[axis], qc["gradient_flip_gain"]


def test_planted_motion_is_measured_and_corrected(series, result, tmp_path):
    """Volume 6 (b=1000) turned 3 degrees about the slice axis and moved 2 voxels (4 mm) along x."""
    data, bval, bvec = _table(series)
    moved = data.astype(np.float32).copy()
    v = 6
    moved[..., v] = ndimage.shift(ndimage.rotate(moved[..., v], 3.0, axes=(0, 1), reshape=False, order=3),
                                  (2, 0, 0), order=3)
    out = compute(_variant(series, tmp_path, moved.clip(0)))
    motion = out.qc["motion"]
    assert motion["displacement_mm"][v] == pytest.approx(4.0 + result.qc["motion"]["displacement_mm"][v], abs=0.8)
    others = [d for i, d in enumerate(motion["displacement_mm"]) if i != v]
    assert max(others) < 1.0
    assert out.measures["FA_WM"] == pytest.approx(result.measures["FA_WM"], abs=0.01)


@pytest.mark.parametrize("case, reason", [
    ("no b0", "no_b0"), ("five directions", "too_few_directions"), ("no bvec", "missing_gradients"),
    ("bval count", "gradients_mismatch"), ("b=2000 protocol", "bvalues_mismatch"),
    ("volume without signal", "incomplete"), ("volumes cut", "incomplete"), ("not unit", "bvec_not_unit"),
    ("3D", "not_dwi"),
])
def test_a_series_no_tensor_can_be_fitted_to_is_refused_by_name(series, tmp_path, case, reason):
    data, bval, bvec = _table(series)
    b0 = bval <= 50
    kwargs, call = {}, {}
    if case == "no b0":
        kwargs = dict(data=data[..., ~b0], bvals=bval[~b0], bvecs=bvec[:, ~b0])
    elif case == "five directions":
        keep = np.flatnonzero(b0).tolist() + np.flatnonzero(~b0)[:5].tolist()
        kwargs = dict(data=data[..., keep], bvals=bval[keep], bvecs=bvec[:, keep])
    elif case == "no bvec":
        kwargs = dict(drop="bvec")
    elif case == "bval count":
        kwargs = dict(bvals=bval[:-1])
    elif case == "b=2000 protocol":
        call = dict(shells=[2000.0])
    elif case == "volume without signal":
        zeroed = data.copy()
        zeroed[..., 9] = 0
        kwargs = dict(data=zeroed)
    elif case == "volumes cut":
        kwargs = dict(data=data[..., :12], bvals=bval[:12], bvecs=bvec[:, :12])
        call = dict(volumes=17)
    elif case == "not unit":
        half = bvec.copy()
        half[:, 3] *= 0.5
        kwargs = dict(bvecs=half)
    elif case == "3D":
        kwargs = dict(data=data[..., 0])
    with pytest.raises(DwiInputError) as err:
        compute(_variant(series, tmp_path, **kwargs), motion=False, **call)
    assert err.value.reason == reason and series.name in str(err.value), str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.dwi", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def test_the_command_writes_bids_derivatives_the_validator_accepts(series, result, tmp_path):
    raw = in_bids(series, tmp_path / "raw")
    out = tmp_path / "derivatives" / "dwi"
    done = _cli("--input", str(raw), "--output-dir", str(out), "--subject", "01", "--session", "1",
                "--shells", "1000", "--volumes", "17")
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    measures = pd.read_csv(listed["outputs"]["measures"], sep="\t").set_index("measure")
    assert measures.loc["MD_WM", "unit"] == "um2/ms" and measures.loc["FA_WM", "unit"] == "1"
    assert measures.loc["FA_WM", "value"] == pytest.approx(result.measures["FA_WM"], abs=1e-6)
    sidecar = json.loads(Path(listed["outputs"]["measures"]).with_suffix(".json").read_text())
    assert sidecar["QC"]["directions"] == 12
    assert sidecar["RawSources"] == ["bids:raw:sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz"]
    fa = nib.load(listed["outputs"]["fa"])
    assert fa.shape == (112, 112, 32) and np.allclose(fa.affine, nib.load(str(series)).affine)
    (out / ".bidsignore").write_text("*_dwimap.*\n*_dwiref.*\n*_measures.*\n")   # what corelab writes from the spec
    errors, _ = bids_validator(out)
    assert errors == [], describe(errors)


def test_a_refused_series_exits_2_with_its_reason_and_writes_nothing(series, tmp_path):
    data, bval, bvec = _table(series)
    b0 = bval <= 50
    bad = in_bids(_variant(series, tmp_path / "bad", data[..., ~b0], bval[~b0], bvec[:, ~b0]), tmp_path / "raw")
    out = tmp_path / "derivatives"
    done = _cli("--input", str(bad), "--output-dir", str(out), "--subject", "01", "--session", "1")
    assert done.returncode == 2 and "[no_b0]" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() or not list(out.rglob("*.nii.gz"))
