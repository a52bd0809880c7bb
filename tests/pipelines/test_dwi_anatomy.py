"""White matter from the same session's T1 (pipelines/dwi/anatomy.py), on the Philips DWI and the
Philips MPRAGE of ../shared/data (same scanner model) run through the anat pipeline, and on T1s
made wrong from it: moved by a known rigid transform (found again), moved too far or given
random labels (refused, the FA-threshold white matter stands), a dseg off the T1's grid.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipelines.dwi.anatomy import MIN_FA_CONTRAST, T1Unusable, t1_tissues, t1_white_matter
from pipelines.dwi.process import OPTIONAL_MEASURES, compute
from pipelines.registry import get_spec
from tests.data import REPO
from tests.helpers import bids_validator, describe
from tests.pipelines.dwi_data import in_bids, philips_dwi, philips_t1_anat

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dwi-t1")
    series = philips_dwi(root / "dwi")
    preproc, dseg = philips_t1_anat(root / "t1")
    maps = compute(series)
    affine = nib.load(str(series)).affine
    return {"series": series, "preproc": preproc, "dseg": dseg, "maps": maps, "affine": affine, "root": root}


def _moved(path: Path, out: Path, degrees: float, mm: tuple[float, float, float]) -> Path:
    """The same voxels with the world moved: rotated about x and y, then shifted (mm)."""
    img = nib.load(str(path))
    move = np.eye(4)
    move[:3, :3] = Rotation.from_euler("xy", [degrees, degrees / 2], degrees=True).as_matrix()
    move[:3, 3] = mm
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), move @ img.affine, img.header), str(out))
    return out


def _tissues(data, preproc: Path, dseg: Path):
    m = data["maps"]
    tissues = t1_tissues(m.fa, m.brain_mask, data["affine"], preproc, dseg)
    return tissues, t1_white_matter(m.fa, m.brain_mask, (2.0, 2.0, 2.0), tissues)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def registered(data):
    return _tissues(data, data["preproc"], data["dseg"])


def test_the_t1s_white_matter_fits_the_dwi(data, registered):
    tissues, (wm, qc) = registered
    assert qc["accepted"] and wm is not None, qc
    assert qc["fa_contrast"] >= MIN_FA_CONTRAST and qc["fa_contrast"] > qc["fa_contrast_moved_max"]
    fa = data["maps"].fa
    # the T1's white matter overlaps the FA > 0.2 white matter (which holds only coherent fibres)
    assert _dice(wm, data["maps"].wm_mask) > 0.55
    assert 0.35 <= float(fa[wm].mean()) <= 0.55
    assert 0.0 <= tissues.wm_fraction.min() and tissues.wm_fraction.max() <= 1.0 + 1e-6


def test_a_t1_moved_by_a_known_rigid_transform_gives_the_same_white_matter(data, registered, tmp_path):
    _, (wm, _) = registered
    moved = [_moved(data[k], tmp_path / f"{k}.nii.gz", 5.0, (6.0, -4.0, 3.0)) for k in ("preproc", "dseg")]
    tissues, (wm_moved, qc) = _tissues(data, *moved)
    assert qc["accepted"], qc
    assert _dice(wm, wm_moved) > 0.9
    # the transform found is the planted one composed with the original's
    assert not np.allclose(tissues.transform, registered[0].transform, atol=1.0)


@pytest.mark.parametrize("case", ["moved_far", "random_labels"])
def test_a_t1_that_does_not_fit_is_refused_and_the_fa_white_matter_stands(data, tmp_path, case):
    if case == "moved_far":
        preproc, dseg = (_moved(data[k], tmp_path / f"{k}.nii.gz", 15.0, (30.0, -20.0, 10.0))
                         for k in ("preproc", "dseg"))
    else:
        labels = nib.load(str(data["dseg"]))
        rng = np.random.default_rng(0)
        shuffled = np.where(np.asarray(labels.dataobj) > 0, rng.integers(1, 4, labels.shape), 0).astype(np.uint8)
        preproc, dseg = data["preproc"], tmp_path / "dseg.nii.gz"
        nib.save(nib.Nifti1Image(shuffled, labels.affine), str(dseg))
    _, (wm, qc) = _tissues(data, preproc, dseg)
    assert wm is None and not qc["accepted"] and qc["reason"], qc


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.dwi", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_the_command_measures_the_t1s_white_matter_in_valid_derivatives(data, tmp_path):
    image = in_bids(data["series"], tmp_path / "bids")
    out = tmp_path / "derivatives" / "dwi"
    proc = _cli("--input", str(image), "--output-dir", str(out), "--subject", "01", "--session", "1",
                "--t1w", str(data["preproc"]), "--t1w-dseg", str(data["dseg"]))
    assert proc.returncode == 0, proc.stderr
    measures = json.loads(proc.stdout)["measures"]
    assert set(OPTIONAL_MEASURES) <= set(measures)
    assert 0.6 <= measures["MD_T1WM"] <= 0.9 and 0.35 <= measures["FA_T1WM"] <= 0.55
    (mask,) = out.rglob("*_label-WM_desc-T1w_mask.nii.gz")
    sidecar = json.loads(next(out.rglob("*_desc-tensor_measures.json")).read_text())
    assert sidecar["QC"]["wm_from_t1w"] == 1 and sidecar["QC"]["t1w"]["image"] == Path(data["preproc"]).name
    assert int(np.asarray(nib.load(str(mask)).dataobj).sum()) * 8 == measures["T1WM_volume"]
    (out / ".bidsignore").write_text("\n".join(get_spec("dwi").bids_ignore) + "\n")   # as corelab writes it
    errors, _ = bids_validator(out)
    assert errors == [], describe(errors)


def test_a_t1_without_its_labels_exits_2_and_one_off_their_grid_is_set_aside(data, tmp_path):
    image = in_bids(data["series"], tmp_path / "bids")
    out = tmp_path / "out"
    args = ("--input", str(image), "--output-dir", str(out), "--subject", "01", "--session", "1")
    alone = _cli(*args, "--t1w", str(data["preproc"]))
    assert alone.returncode == 2 and "--t1w-dseg" in alone.stderr and "Traceback" not in alone.stderr
    assert not (out / "sub-01").exists()
    # another pipeline's files that are not a pair never refuse the site's DWI: measured without
    # them, and the QC sidecar says why (the gate warns on dwi_t1w_rejected)
    off = _moved(data["dseg"], tmp_path / "off" / "dseg.nii.gz", 0.0, (1.0, 0.0, 0.0))
    with pytest.raises(T1Unusable, match="not on the grid"):
        t1_tissues(data["maps"].fa, data["maps"].brain_mask, data["affine"], data["preproc"], off)
    proc = _cli(*args, "--t1w", str(data["preproc"]), "--t1w-dseg", str(off))
    assert proc.returncode == 0, proc.stderr
    assert not set(OPTIONAL_MEASURES) & set(json.loads(proc.stdout)["measures"])
    qc = json.loads(next(out.rglob("*_desc-tensor_measures.json")).read_text())["QC"]
    assert qc["t1w_rejected"] == 1 and "not on the grid" in qc["t1w"]["reason"]
    assert not list(out.rglob("*_desc-T1w_mask.nii.gz"))
