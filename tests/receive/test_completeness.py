"""A series that lacks what its own headers or the media's DICOMDIR promise is incomplete: kept,
not converted, and asked for; what is no image (a report object, the DICOMDIR itself) is kept apart
without a query; a series of derived images only is no acquisition (issue 13).

Each case is made from real series of ../shared/data by transformation: a volume's files removed
from the Siemens XA61 enhanced multiband BOLD (7 files of 10 frames, TemporalPositionIndex per
frame) and from the GE EPI (150 classic slices, no temporal index, NumberOfTemporalPositions 10),
one slice removed, the XA60/XA61 folders as they are (their DICOMDIR lists a localizer that is
absent), and the GE series relabelled DERIVED.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from tasks.bids.convert import convert_study
from tasks.intake.inventory import inventory_upload
from tasks.lake import tables
from tasks.lake.storage import Lake
from tasks.receive.record import record_study
from tasks.receive.study import Upload, quarantine_finding, receive_one_study
from tests.data import shared_path

XA61 = ("dcm_qa_xa60", "In", "XA61")
XA61_DICOM = (*XA61, "DICOM", "24100310", "14440000")
GE = ("dcm_qa_nih", "In", "20180918GE", "mr_0004")


def _series_files(parts: tuple[str, ...], number: int) -> list[Path]:
    """The files of series ``number`` in InstanceNumber order."""
    out = []
    for f in sorted(shared_path(*parts).iterdir()):
        if f.name.startswith("README"):
            continue
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if int(ds.SeriesNumber) == number:
            out.append((int(ds.InstanceNumber), f))
    return [f for _, f in sorted(out)]


def _receive(tmp_path: Path, trial, site: str, upload: Path):
    lake = Lake(str(tmp_path / "lake")).init()
    inv = inventory_upload(upload)
    o = receive_one_study(Upload(trial, site, "u1", lake, inv.absent()), inv.accepted)
    record_study(lake, o, o.matcher)
    return lake, o, inv


def _copy(files: list[Path], folder: Path, transform=None) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        if transform is None:
            shutil.copy(f, folder / f.name)
        else:
            ds = pydicom.dcmread(f)
            transform(ds)
            ds.save_as(folder / f.name)
    return folder


@pytest.mark.parametrize("drop,missing", [(3, "volume(s) 4"), (6, "volume(s) 7"), (0, "volume(s) 1")])
def test_an_enhanced_series_missing_a_volume_is_incomplete_and_not_converted(tmp_path, trial, drop, missing):
    files = _series_files(XA61_DICOM, 4)
    assert len(files) == 7
    lake, o, _ = _receive(tmp_path, trial, "siemens-xa61", _copy(files[:drop] + files[drop + 1:], tmp_path / "up"))
    (series,) = o.series
    assert (series.series_type, series.verdict) == ("bold", "incomplete")
    (f,) = [f for f in series.findings if f.kind == "incomplete_series"]
    assert f.severity == "major" and f.reason_code == "incomplete_series"
    assert "1 of the 7 volumes" in f.message and missing in f.message
    images, problems = convert_study(lake, trial, o.study)
    assert images == {} and problems == []
    assert not any(p.endswith(".nii.gz") for p in lake.find("bids"))
    queries = tables.read_table(lake, "queries")
    assert len(queries) and queries["message"].str.contains("incomplete").any()


def test_the_whole_enhanced_series_is_complete(tmp_path, trial):
    lake, o, _ = _receive(tmp_path, trial, "siemens-xa61", _copy(_series_files(XA61_DICOM, 4), tmp_path / "up"))
    (series,) = o.series
    assert (series.series_type, series.verdict) == ("bold", "conform"), [f.message for f in series.findings]


@pytest.mark.parametrize("drop", ["volume", "slice"])
def test_a_classic_series_without_temporal_indices_missing_images_is_incomplete(tmp_path, trial, drop):
    files = _series_files(GE, 4)
    assert len(files) == 150
    # GE writes slices in time order: files 61-75 are the fifth volume
    kept = files[:60] + files[75:] if drop == "volume" else files[:70] + files[71:]
    lake, o, _ = _receive(tmp_path, trial, "ge-nih", _copy(kept, tmp_path / "up"))
    (series,) = o.series
    assert series.verdict == "incomplete", [f.message for f in series.findings]
    (f,) = [f for f in series.findings if f.kind == "incomplete_series"]
    assert "NumberOfTemporalPositions" in f.message
    assert ("15 of its 15 slice positions" if drop == "volume" else "1 of its 15 slice positions") in f.message


def test_the_xa_folders_as_sent_name_the_absent_localizer_and_keep_reports_apart(tmp_path, trial):
    lake, o, inv = _receive(tmp_path, trial, "siemens-xa61", shared_path(*XA61))
    codes = sorted({r.code for r in inv.rejected})
    assert codes == ["dicomdir", "not_an_image", "not_dicom"]
    sr = [r for r in inv.rejected if r.code == "not_an_image"]
    assert len(sr) == 11 and all("Enhanced SR Storage object, not an image" in r.reason for r in sr)
    assert {quarantine_finding(r).severity for r in inv.rejected} == {"minor"}
    (gap,) = [f for f in o.findings if f.kind == "incomplete_series"]
    assert gap.severity == "major" and gap.observed == "series 1: 1 of 1 file(s)"
    assert all(s.verdict != "incomplete" for s in o.series)


def test_a_series_missing_a_file_the_dicomdir_lists_is_incomplete(tmp_path, trial):
    """The DICOMDIR's list is checked even where the headers would not tell (a file renamed away)."""
    up = tmp_path / "up"
    shutil.copytree(shared_path(*XA61), up)
    victim = _series_files(XA61_DICOM, 16)[2]
    (up / victim.relative_to(shared_path(*XA61))).unlink()
    lake, o, inv = _receive(tmp_path, trial, "siemens-xa61", up)
    series_uid = str(pydicom.dcmread(victim, stop_before_pixels=True).SeriesInstanceUID)
    assert [v[:2] for k, v in inv.absent().items() if k[1] == series_uid] == [(1, 7)]
    (series,) = [s for s in o.series if s.series_number == 16]
    assert series.verdict == "incomplete"
    assert any("volume(s) 3" in f.message for f in series.findings if f.kind == "incomplete_series")


def test_a_series_of_derived_images_only_is_no_acquisition(tmp_path, trial):
    def derived(ds):
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]

    lake, o, _ = _receive(tmp_path, trial, "ge-nih", _copy(_series_files(GE, 4), tmp_path / "up", derived))
    (series,) = o.series
    assert (series.series_type, series.verdict) == (None, "unclassified")
    (f,) = series.findings
    assert f.kind == "derived_image" and f.severity == "minor" and "DERIVED" in f.message
    # and the protocol now misses its required bold at ge-nih
    assert any(f.kind == "missing_series" for f in o.findings)
