"""The virtual scanner (issue 12's virtual trial): a real head made into a subject, written as Philips writes.

Checked on what corelab and the field's tools make of the files, not on the arrays that made them:
dcm2niix converts the series, corelab receives it as a conforming T1w of the Philips site and
de-identifies it (none of the planted PHI is left), the anat pipeline passes it, and the planted
effects are measured back: head volume follows the age scaling, and a scanner's gradient
calibration error scales every measured volume by its cube.
"""

from __future__ import annotations

import subprocess
from datetime import date
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from data_contracts.trial import load_trial
from flows.cli import app
from flows.process_study import process_study
from flows.receive_study import receive_study
from flows.virtual.plan import make_plan, write_trial_file
from flows.virtual.scanner import (
    AGE_REF,
    AGE_VOLUME_SLOPE,
    Person,
    Scanner,
    read_template,
    subject_head,
    write_t1_series,
)
from tasks.bids.convert import dcm2niix_binary
from tasks.lake.storage import open_lake
from tasks.lake.tables import read_table
from tests.data import SHARED, shared_path

CHRIS = ("niivue-images", "chris_t1.nii.gz")
pytestmark = [pytest.mark.prefect, pytest.mark.pipeline]
PERSON = Person("VT-0042", "Virtual^Jane^Q", "F", date(1956, 4, 3), 68.0)
SCANNER = Scanner("philips", "5.7.1\\5.7.1.1", "45053")


@pytest.fixture(scope="module")
def source():
    return sitk.ReadImage(str(shared_path(*CHRIS)))


def _series(tmp: Path, source, age: float, scanner: Scanner = SCANNER, seed: int = 7) -> Path:
    head = subject_head(source, age, seed, scanner.grid)
    out = tmp / f"series-{age}-{scanner.calibration}"
    write_t1_series(out, read_template(SHARED, "philips"), head, scanner, PERSON, generate_uid(),
                    date(2025, 1, 15), seed)
    return out


def _head_volume_ml(series: Path, tmp: Path) -> float:
    """The head's volume as dcm2niix's NIfTI states it: voxels above a tenth of the 99th percentile."""
    out = tmp / f"nii-{series.name}"
    out.mkdir()
    subprocess.run([dcm2niix_binary(), "-o", str(out), "-f", "x", str(series)], check=True, capture_output=True)
    img = nib.load(str(out / "x.nii"))
    a = np.asarray(img.dataobj, dtype=float)
    return float((a > 0.1 * np.percentile(a, 99)).sum() * np.prod(img.header.get_zooms()[:3]) / 1000)


def test_the_series_is_a_conforming_philips_t1_with_no_phi_left_and_it_passes_anat(
        prefect_harness, trial, source, tmp_path):
    series = _series(tmp_path, source, age=68)
    (o,) = receive_study(str(series), "philips-ingenia", lake_url=str(tmp_path / "lake"), trial=trial)
    assert o.status == "accepted" and o.n_quarantined == 0
    (s,) = o.series
    assert (s.series_type, s.verdict) == ("T1w", "conform"), s
    deid = b"".join(p.read_bytes() for p in (tmp_path / "lake" / "deid").rglob("*.dcm"))
    assert deid
    for phi in (b"Virtual^Jane", b"VT-0042", b"19560403", b"20250115"):
        assert phi not in deid, phi
    (sq,) = process_study(o.study.study_key, "philips-ingenia", lake_url=str(tmp_path / "lake"), trial=trial)
    assert sq.verdict.status == "PASS", sq.verdict.reasons


def test_head_volume_follows_the_planted_age_scaling(source, tmp_path):
    young, old = 30.0, 80.0
    measured = _head_volume_ml(_series(tmp_path, source, old), tmp_path) / \
        _head_volume_ml(_series(tmp_path, source, young), tmp_path)
    planted = (1 + AGE_VOLUME_SLOPE * (old - AGE_REF)) / (1 + AGE_VOLUME_SLOPE * (young - AGE_REF))
    assert measured == pytest.approx(planted, abs=0.01), (measured, planted)


def test_a_scanner_calibration_error_scales_every_measured_volume_by_its_cube(source, tmp_path):
    off = Scanner("philips", "5.7.1\\5.7.1.1", "45053", calibration=1.03)
    ratio = _head_volume_ml(_series(tmp_path, source, 60, off), tmp_path) / \
        _head_volume_ml(_series(tmp_path, source, 60), tmp_path)
    assert ratio == pytest.approx(1 / 1.03 ** 3, abs=0.005), ratio


def test_further_sites_have_their_own_scanners_in_their_trial_file_and_conform(prefect_harness, source, tmp_path):
    """``--sites 5``: site-d (Philips) and site-e (Siemens) join with no planted event; each one's
    first series is a conforming T1w of its own site, and the same series sent by site-a is not
    (its scanner is site-d's alone)."""
    plan = make_plan(4, 2, sites=5)
    trial = load_trial(write_trial_file(plan.sites, tmp_path / "trial"))
    assert [s.id for s in trial.sites] == list(plan.sites) == ["site-a", "site-b", "site-c", "site-d", "site-e"]
    extra = [s for s in plan.scans if s.site in ("site-d", "site-e")]
    assert len(extra) == 16 and not any(s.header or s.scanner.slices_kept for s in extra)
    assert len({s.scanner for s in extra}) == 2          # one scanner each, never upgraded
    lake = str(tmp_path / "lake")
    for site in ("site-d", "site-e"):
        scan = next(s for s in extra if s.site == site)
        head = subject_head(source, scan.age, scan.anatomy_seed, scan.scanner.grid)
        folder = scan.folder(tmp_path / "up")
        write_t1_series(folder, read_template(SHARED, scan.scanner.vendor), head, scan.scanner, scan.person,
                        generate_uid(), scan.day, scan.anatomy_seed)
        (o,) = receive_study(str(folder), site, lake_url=lake, trial=trial)
        assert o.status == "accepted" and [(s.series_type, s.verdict) for s in o.series] == [("T1w", "conform")]
    wrong = tmp_path / "wrong"
    write_t1_series(wrong, read_template(SHARED, "philips"), head, plan.sites["site-d"], PERSON, generate_uid(),
                    date(2025, 1, 15), 3)
    (o,) = receive_study(str(wrong), "site-a", lake_url=lake, trial=trial)
    devs = read_table(open_lake(lake), "deviations")
    assert set(devs["kind"]) == {"unknown_scanner"}
    assert set(devs["series_uid"]) == {o.series[0].series_uid} and "4505301" in devs["observed"].iloc[0]


@pytest.mark.parametrize("args", [["--sites", "2"], ["--sites", "27"], ["--subjects", "3"], ["--visits", "4"]])
def test_a_virtual_trial_the_truths_cannot_hold_in_is_refused_before_anything_runs(args, tmp_path):
    done = CliRunner().invoke(app, ["demo", "--data", str(SHARED), "--lake", str(tmp_path / "lake"), *args])
    assert done.exit_code == 2 and " ".join(args) in done.output, done.output
    assert not (tmp_path / "lake").exists()
