"""The bold QC pipeline on the BOLD series of ../shared/data (GE EPI of a volunteer, Siemens XA60 and
XA61 enhanced multiband phantoms, converted as corelab's BIDS stage converts them) and on series made
wrong from them: planted motion of known size, a planted ghost, a spike volume, the XA60 slice
timing fault, and each refusal. Where a field library computes the same quantity (nipype's FD and
tSNR), the test holds ours to it.
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
import SimpleITK as sitk

from data_contracts.qc_settings import DEFAULT_RULES, RobustZ
from pipelines.bold import iqms
from pipelines.bold import realign as R
from pipelines.bold.errors import BoldInputError
from pipelines.bold.process import compute, load_bold
from tasks.qc.gate import judge
from tests.data import REPO
from tests.helpers import bids_validator, describe
from tests.pipelines.bold_data import convert

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def ge(tmp_path_factory) -> Path:
    return convert("ge", tmp_path_factory.mktemp("ge"))


@pytest.fixture(scope="module")
def xa61(tmp_path_factory) -> Path:
    return convert("xa61", tmp_path_factory.mktemp("xa61"))


def _variant(series: Path, out: Path, data: np.ndarray | None = None, sidecar: dict | None = None,
             drop_sidecar: bool = False) -> Path:
    img = nib.load(str(series))
    out.mkdir(parents=True, exist_ok=True)
    target = out / series.name
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data, img.affine, img.header), str(target))
    if not drop_sidecar:
        side = json.loads(series.with_name(series.name.replace(".nii.gz", ".json")).read_text())
        side.update(sidecar or {})
        target.with_name(target.name.replace(".nii.gz", ".json")).write_text(json.dumps(side))
    return target


def _sidecar_metrics(qc: dict) -> dict[str, float]:
    """The QC values the gate reads, named as the registry's spec names them."""
    from pipelines.registry import get_spec

    return {m.metric: float(qc[m.path]) for m in get_spec("bold").qc_metrics}


def _planted(ge: Path, seed: int, size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ten copies of the GE series' first volume, each moved by a known rigid transform (up to
    ``size`` mm and degrees on each axis) and given its own noise at tSNR 50; (data, RAS affine,
    the expected parameters of each volume relative to the middle one, as the realignment reports)."""
    ras, data, _ = load_bold(ge, None)
    zooms = ras.header.get_zooms()
    base = data[..., 0]
    rng = np.random.default_rng(seed)
    truth = np.zeros((10, 6))
    truth[1:, :3] = rng.uniform(-size, size, (9, 3))
    truth[1:, 3:] = np.radians(rng.uniform(-size, size, (9, 3)))
    ref = R.volume_image(base, zooms)
    c = R.center_of(ref)
    sd = float(np.median(base[base > np.percentile(base, 75)])) / 50
    vols = [sitk.GetArrayFromImage(sitk.Resample(ref, ref, R.euler(t, c), sitk.sitkBSpline, 0.0,
                                                 sitk.sitkFloat32)).transpose(2, 1, 0) for t in truth]
    planted = np.abs(np.stack([v + rng.normal(0, sd, v.shape) for v in vols], -1)).astype(np.float32)
    # volume v was made as base(T_v x); realigned to volume 5 it is found as S_v = T_v^-1 o T_5
    expected = []
    for t in truth:
        s = sitk.CompositeTransform([R.euler(t, c).GetInverse(), R.euler(truth[5], c)])
        m, o = np.eye(3), np.array(s.TransformPoint(c)) - np.array(c)
        for i in range(3):
            m[:, i] = np.array(s.TransformPoint(tuple(np.array(c) + np.eye(3)[i]))) - np.array(s.TransformPoint(c))
        e = sitk.Euler3DTransform()
        e.SetCenter(c)
        e.SetMatrix(tuple(m.ravel()), 1e-4)
        e.SetTranslation(tuple(o))
        expected.append([*e.GetTranslation(), e.GetAngleX(), e.GetAngleY(), e.GetAngleZ()])
    return planted, ras.affine, np.array(expected)


def test_framewise_displacement_is_nipypes(tmp_path):
    """Our FD equals nipype's FramewiseDisplacement (Power 2012, AFNI-ordered parameters) on the same
    parameters."""
    from nipype.algorithms.confounds import FramewiseDisplacement

    rng = np.random.default_rng(3)
    params = np.column_stack([rng.normal(0, 0.5, (20, 3)), rng.normal(0, 0.01, (20, 3))])
    # AFNI's order: roll, pitch, yaw (degrees), then dS, dL, dP (mm)
    afni = np.column_stack([np.degrees(params[:, 3:]), params[:, :3]])
    np.savetxt(tmp_path / "par.1D", afni)
    res = FramewiseDisplacement(in_file=str(tmp_path / "par.1D"), parameter_source="AFNI",
                                out_file=str(tmp_path / "fd.txt"), out_figure=str(tmp_path / "fd.pdf"),
                                save_plot=False).run(cwd=str(tmp_path))
    theirs = np.loadtxt(res.outputs.out_file, skiprows=1)
    np.testing.assert_allclose(R.framewise_displacement(params), theirs, atol=1e-4)


def test_tsnr_map_is_nipypes(xa61, tmp_path):
    from nipype.algorithms.confounds import TSNR

    res = TSNR(in_file=str(xa61)).run(cwd=str(tmp_path))
    theirs = np.asanyarray(nib.load(res.outputs.tsnr_file).dataobj)
    ours = iqms.tsnr_map(np.asanyarray(nib.load(str(xa61)).dataobj, dtype=np.float32))
    valid = np.isfinite(theirs) & (theirs > 0)
    # nipype reduces in float32, we in float64: they differ by 0.27 % at most on this series
    np.testing.assert_allclose(ours[valid], theirs[valid], rtol=5e-3)
    assert np.median(np.abs(ours[valid] / theirs[valid] - 1)) < 1e-3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planted_motion_is_recovered_within_a_tenth_of_a_millimetre_and_fails_the_gate(ge, seed):
    """Mean FD (what the gate judges) within 0.1 mm of the planted (0.04-0.07 mm measured); each
    volume's FD within 0.15 mm (the sum of six parameters' errors on 3.75 x 3.75 x 5 mm voxels:
    0.10-0.11 mm measured); each parameter within 0.1 mm or 0.1 degree."""
    data, affine, expected = _planted(ge, seed, 0.6)
    from pipelines.bold.process import brain_mask

    zooms = tuple(nib.affines.voxel_sizes(affine))
    found = R.realign(data, zooms, brain_mask(data.mean(-1), zooms, ge))
    fd, fd_true = R.framewise_displacement(found.parameters), R.framewise_displacement(expected)
    assert abs(fd.mean() - fd_true.mean()) < 0.1 and fd_true.mean() > 1.0, (fd.round(3), fd_true.round(3))
    assert np.abs(fd - fd_true).max() < 0.15, (fd.round(3), fd_true.round(3))
    assert np.abs(found.parameters - expected)[:, :3].max() < 0.1                 # mm
    assert np.degrees(np.abs(found.parameters - expected)[:, 3:]).max() < 0.1     # degrees
    assert R.implausible(found.parameters) == []
    v = judge({"bold_fd_mean": float(fd.mean())}, DEFAULT_RULES, {}, RobustZ())
    assert v.status == "FAIL" and "bold_fd_mean" in " ".join(v.reasons)


def test_planted_motion_through_the_whole_pipeline(ge, tmp_path):
    """The same planted series as a file: the pipeline's FD and its QC verdict."""
    data, affine, expected = _planted(ge, 1, 0.6)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "sub-01_ses-1_task-rest_bold.nii.gz"
    nib.save(img, str(path))
    path.with_name("sub-01_ses-1_task-rest_bold.json").write_text(
        ge.with_name(ge.name.replace(".nii.gz", ".json")).read_text())
    q = compute(path)
    assert abs(q.qc["fd_mean"] - R.framewise_displacement(expected).mean()) < 0.1
    v = judge(_sidecar_metrics(q.qc), DEFAULT_RULES, {}, RobustZ())
    assert v.status == "FAIL"
    assert any(r.startswith("bold_fd_mean") for r in v.reasons), v.reasons


def test_the_moving_volunteer_fails_on_realignment_and_tsnr(ge):
    """The GE series' volunteer moves throughout: five volumes have no rigid match (each would be
    "found" 20-50 mm away), and the gate fails the series, never reporting them as measured motion."""
    q = compute(ge)
    assert q.qc["volumes"] == 10 and q.qc["slice_timing_errors"] == 0 and q.qc["slice_timing_absent"] == 0
    assert q.qc["realign_failed"] >= 3
    v = judge(_sidecar_metrics(q.qc), DEFAULT_RULES, {}, RobustZ())
    assert v.status == "FAIL"
    failed = {r.metric for r in v.metrics if r.status == "FAIL"}
    assert {"bold_realign_failed", "bold_tsnr"} <= failed


def test_still_phantoms_pass(xa61, tmp_path):
    q = compute(xa61)
    assert q.qc["realign_failed"] == 0 and q.qc["fd_mean"] < 0.2 and q.qc["tsnr"] > 20
    assert q.qc["slice_timing_errors"] == 0
    assert judge(_sidecar_metrics(q.qc), DEFAULT_RULES, {}, RobustZ()).status == "PASS"


def test_a_planted_ghost_raises_the_ghost_to_signal_ratio(xa61):
    data = np.asanyarray(nib.load(str(xa61)).dataobj, dtype=np.float32)
    mean = data.mean(-1)
    from pipelines.bold.process import brain_mask

    ras = nib.as_closest_canonical(nib.load(str(xa61)))
    mean = np.asanyarray(ras.dataobj, dtype=np.float32).mean(-1)
    mask = brain_mask(mean, ras.header.get_zooms(), xa61)
    ghosted = mean + 0.2 * np.roll(mean, mean.shape[1] // 2, axis=1)
    before, after = iqms.ghost_to_signal(mean, mask, 1), iqms.ghost_to_signal(ghosted, mask, 1)
    assert after - before > 0.05, (before, after)
    assert abs(iqms.ghost_to_signal(ghosted, mask, 0) - iqms.ghost_to_signal(mean, mask, 0)) < after - before


def test_a_spike_volume_is_an_outlier_and_a_carpet_spike(xa61):
    data = np.asanyarray(nib.load(str(xa61)).dataobj, dtype=np.float32).copy()
    mask = data.mean(-1) > np.percentile(data.mean(-1), 80)
    clean = iqms.outlier_fraction(data, mask)
    data[..., 4] *= 1.3
    spiked = iqms.outlier_fraction(data, mask)
    assert spiked[4] > 0.5 and spiked[4] > 10 * clean[4]
    _, spikes = iqms.carpet(data, mask)
    assert 4 in spikes.tolist()
    assert iqms.quality_index(data, mask)[4] < 0.05    # the same picture, brighter: rank order kept


def test_global_correlation_is_the_mean_pairwise_correlation():
    rng = np.random.default_rng(0)
    ts = rng.normal(size=(50, 30)) + rng.normal(size=30)      # a shared signal
    data = ts.reshape(5, 10, 1, 30)
    mask = np.ones((5, 10, 1), bool)
    r = np.corrcoef(ts)
    assert iqms.global_correlation(data, mask) == pytest.approx(r.mean(), rel=1e-9)


SB = [0, 0.4925, 0.985, 0.2475, 0.74, 0.12, 0.61, 1.1, 0.37, 0.86]   # ten distinct times: single-band


@pytest.mark.parametrize("change,present,problem", [
    ({}, True, None),
    ({"SliceTiming": SB}, True, "single-band timing in a multiband series"),
    ({"SliceTiming": [0, 0.5, 0.25]}, True, "3 times for 10 slices"),
    ({"SliceTiming": [t + 1.0 for t in SB[:5]] * 2}, True, "outside [0, TR"),
    ({"SliceTiming": None}, False, None),
])
def test_slice_timing_check(xa61, change, present, problem):
    side = json.loads(xa61.with_name(xa61.name.replace(".nii.gz", ".json")).read_text())
    side.update(change)
    if change.get("SliceTiming", 0) is None:
        del side["SliceTiming"]
    got_present, problems = iqms.slice_timing_problems(side, 10)
    assert got_present is present
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


def test_the_xa60_slice_timing_fault_fails_the_series(xa61, tmp_path):
    q = compute(_variant(xa61, tmp_path / "sb", sidecar={"SliceTiming": SB}))
    assert q.qc["slice_timing_errors"] == 1
    v = judge(_sidecar_metrics(q.qc), DEFAULT_RULES, {}, RobustZ())
    assert v.status == "FAIL" and any(r.startswith("bold_slice_timing_errors") for r in v.reasons)


@pytest.mark.parametrize("make,reason", [
    (lambda d: d[..., 0], "not_bold"),
    (lambda d: d[..., :2], "too_few_volumes"),
    (lambda d: np.concatenate([d[..., :5], np.zeros_like(d[..., :2])], -1), "incomplete"),
    (lambda d: np.zeros_like(d), "incomplete"),
])
def test_refusals_name_their_reason(xa61, tmp_path, make, reason):
    data = np.asanyarray(nib.load(str(xa61)).dataobj)
    path = _variant(xa61, tmp_path / reason, data=make(data))
    with pytest.raises(BoldInputError) as err:
        compute(path)
    assert err.value.reason == reason and path.name in str(err.value)


def test_too_few_volumes_for_the_protocol(xa61):
    with pytest.raises(BoldInputError, match=r"\[too_few_volumes\].*7 volumes, at least 100"):
        compute(xa61, volumes=100)


def test_command_line_writes_valid_derivatives_and_refuses_with_exit_2(xa61, tmp_path):
    out = tmp_path / "derivatives" / "bold"
    cmd = [sys.executable, "-m", "pipelines.bold", "--input", str(xa61), "--output-dir", str(out),
           "--subject", "01", "--session", "1", "--task", "rest", "--run", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["measures"]) == {"FD_mean", "FD_perc", "tSNR"}
    confounds = pd.read_csv(result["outputs"]["confounds"], sep="\t", na_values="n/a")
    assert len(confounds) == 7 and np.isnan(confounds["framewise_displacement"][0])
    side = json.loads(Path(result["outputs"]["measures"]).with_suffix("").with_suffix(".json").read_text())
    assert side["QC"]["volumes"] == 7 and side["InputSHA256"]
    from pipelines.registry import get_spec

    (out / ".bidsignore").write_text("\n".join(get_spec("bold").bids_ignore) + "\n")
    errors, _ = bids_validator(out)
    assert errors == [], describe(errors)
    bad = _variant(xa61, tmp_path / "short", data=np.asanyarray(nib.load(str(xa61)).dataobj)[..., :2])
    done = subprocess.run([*cmd[:4], str(bad), *cmd[5:6], str(tmp_path / "other"), *cmd[7:]],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "[too_few_volumes]" in done.stderr and "Traceback" not in done.stderr
