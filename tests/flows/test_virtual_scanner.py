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

from flows.process_study import process_study
from flows.receive_study import receive_study
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
