"""``anat`` on bad inputs and arguments, its command line, and its all-or-nothing write.

Bad inputs are made from real files of ../shared/data (a slab cut from a real
T1 as a localizer, real files cut short, a real image with a singular affine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pipelines.anat.run as anat_run
from pipelines.anat import (
    NAME,
    VERSION,
    AnatArgumentError,
    AnatInputError,
    AnatOutputError,
    run_anat,
)
from pipelines.anat.io import from_sitk, load_t1, to_sitk
from pipelines.anat.process import AnatMaps
from tests.data import shared_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def xa30() -> Path:
    return shared_path("dcm_qa_xa30", "Ref", "5_anat-T1w_acq-tfl.nii")


@pytest.fixture(scope="module")
def chris() -> Path:
    return shared_path("niivue-images", "chris_t1.nii.gz")


def _localizer(src: Path, dst: Path) -> Path:
    img = nib.load(str(src))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 90:93], img.affine), str(dst))
    return dst


def _truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _singular(src: Path, dst: Path) -> Path:
    img = nib.load(str(src))
    # Written through the header: nibabel will not build an image from a singular affine.
    hdr = img.header.copy()
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row][2] = 0.0  # the third voxel axis maps nowhere
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, hdr), str(dst))
    return dst


def _text(dst: Path) -> Path:
    dst.write_text("not an image")
    return dst


BAD = {
    "2D localizer": (lambda s, d: _localizer(s, d / "loc.nii.gz"), "2D localizer"),
    "truncated .nii": (lambda s, d: _truncated(s, d / "cut.nii", 0.5), "truncated"),
    "truncated .nii.gz": (lambda s, d: _truncated(s, d / "cut.nii.gz", 0.6), "truncated"),
    "singular affine": (lambda s, d: _singular(s, d / "flat.nii.gz"), "singular"),
    "not a NIfTI": (lambda s, d: _text(d / "notes.nii"), "not a readable NIfTI"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, xa30, chris, tmp_path):
    make, words = BAD[case]
    bad = make(chris if case.startswith(("2D", "truncated .nii.gz")) else xa30, tmp_path)
    root = tmp_path / "deriv"
    with pytest.raises(AnatInputError) as err:
        run_anat(bad, root, "s1", "v1")
    assert str(bad) in str(err.value) and words in str(err.value)
    assert not root.exists()


def test_four_volumes_and_missing_file_are_refused(xa30, tmp_path):
    img = nib.load(str(xa30))
    four = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([np.asanyarray(img.dataobj)] * 2, axis=-1), img.affine),
             str(four))
    with pytest.raises(AnatInputError, match="2 volumes"):
        load_t1(four)
    with pytest.raises(AnatInputError, match="no such file"):
        load_t1(tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("kwargs, words", [
    ({"subject": "a_b"}, "subject 'a_b'"),
    ({"session": "v-1"}, "session 'v-1'"),
    ({"entities": {"task": "rest"}}, "unknown BIDS entities"),
    ({"entities": {"run": 0}}, "run 0"),
    ({"container_digest": "latest"}, "container digest"),
])
def test_bad_arguments_are_refused_before_reading(kwargs, words, tmp_path):
    args = {"subject": "s1", "session": "v1", **kwargs}
    with pytest.raises(AnatArgumentError, match=words):
        run_anat(tmp_path / "never-read.nii.gz", tmp_path / "deriv", args.pop("subject"),
                 args.pop("session"), **args)
    assert not (tmp_path / "deriv").exists()


def test_cli_bad_input_exit_code_and_one_line(xa30, tmp_path):
    bad = _truncated(xa30, tmp_path / "cut.nii", 0.5)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.anat", "--input", str(bad), "--output-dir",
         str(tmp_path / "deriv"), "--subject", "s1", "--session", "v1"],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "AnatInputError" in lines[0] and str(bad) in lines[0]
    assert not (tmp_path / "deriv").exists()


@pytest.mark.pipeline
def test_cli_success_writes_named_outputs(xa30, tmp_path):
    root = tmp_path / "deriv"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.anat", "--input", str(xa30), "--output-dir", str(root),
         "--subject", "p01", "--session", "m00", "--acq", "tfl", "--run", "2", "--threads", "2",
         "--container-digest", "sha256:" + "0" * 64],
        cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    measures = root / "sub-p01/ses-m00/anat/sub-p01_ses-m00_acq-tfl_run-2_desc-volumes_measures.tsv"
    assert Path(report["outputs"]["measures"]) == measures and measures.is_file()
    assert (root / "sub-p01/figures/sub-p01_ses-m00_acq-tfl_run-2_desc-dseg_T1w.png").is_file()
    assert set(report["measures"]) == {"TIV", "GM", "WM", "CSF", "GM_fraction"}


def _fake_maps(img: nib.Nifti1Image) -> AnatMaps:
    """Cheap stand-in for the computation, to test the writing on its own."""
    shape = img.shape
    mask = np.zeros(shape, bool)
    mask[20:60, 30:90, 30:90] = True
    post = np.zeros((3,) + shape, np.float32)
    post[0][mask] = 1.0
    return AnatMaps(preproc=img.get_fdata(dtype=np.float32), bias_field=np.ones(shape, np.float32),
                    brain_mask=mask, posteriors=post, dseg=mask.astype(np.uint8),
                    measures={"TIV": 1.0, "GM": 1.0, "WM": 0.0, "CSF": 0.0, "GM_fraction": 1.0},
                    qc={"bias_field": {"median": 1.0, "p05": 1.0, "p95": 1.0, "p95_over_p05": 1.0}})


def test_failure_while_writing_leaves_no_partial_derivative(xa30, tmp_path, monkeypatch):
    monkeypatch.setattr(anat_run, "compute", lambda img, params: _fake_maps(img))
    root = tmp_path / "deriv"
    kept = run_anat(xa30, root, "s1", "v1", entities={"run": 1})  # an earlier, complete run

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(anat_run, "overlay_png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_anat(xa30, root, "s1", "v1", entities={"run": 2})
    assert not list(root.rglob("*run-2*"))
    assert not list(root.glob(".anat-staging-*"))
    assert all(p.is_file() for p in kept.outputs.values())


def test_derivatives_of_another_container_are_not_mixed(xa30, tmp_path, monkeypatch):
    monkeypatch.setattr(anat_run, "compute", lambda img, params: _fake_maps(img))
    root = tmp_path / "deriv"
    run_anat(xa30, root, "s1", "v1", container_digest="sha256:" + "1" * 64)
    with pytest.raises(AnatOutputError, match="dataset_description.json"):
        run_anat(xa30, root, "s2", "v1", container_digest="sha256:" + "2" * 64)
    assert not (root / "sub-s2").exists()
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == NAME and desc["GeneratedBy"][0]["Version"] == VERSION


def test_sitk_conversion_keeps_world_coordinates(chris):
    img = load_t1(chris)
    oblique = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine @ _rotation(0.2, 0.1))
    image = to_sitk(oblique)
    for ijk in [(0, 0, 0), (10, 200, 33), (187, 255, 189)]:
        ras = nib.affines.apply_affine(oblique.affine, ijk)
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-4)
    assert np.array_equal(from_sitk(image), np.asanyarray(oblique.dataobj))


def _rotation(a: float, b: float) -> np.ndarray:
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx
    return out
