"""Mosaics of every vendor that writes them are read as mosaics (issue: every vendor's data, class 8).

A United Imaging mosaic DTI was tabled as 256x320 with 17 slices and 1 volume: only the Siemens
MOSAIC ImageType and CSA header were recognised. United Imaging writes no MOSAIC ImageType and no
CSA header; it counts the slices in a private element (0065,xx50 of the "Image Private Header"
block) and fills only as many rows of tiles as the slices need (dcm2niix's nii_demosaic).

The cases are built from the real Siemens mosaics (5 slices in a 3x3 grid, 35 in 6x6) by the
transformation a UIH scanner's layout implies: Manufacturer UIH, the Siemens private blocks gone,
no MOSAIC in ImageType, the count in the UIH element (also with its block moved, as a PACS may),
and the tiles re-packed into UIH's grid (5 slices: 3 across, 2 down). Also: a Siemens mosaic whose
CSA header was stripped (its private count still there) and one with no count at all (the
AcquisitionMatrix fallback dcm2niix uses).
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from flows.cli.demo import DEMO_UPLOADS
from tasks.bids.convert import convert_study
from tasks.conformance.parameters import mosaic, series_parameters
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.receive.record import record_study
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import copy_upload, dicom_files

SIEMENS_NIH = tuple(DEMO_UPLOADS["siemens-nih"].split("/")) + ("mr_0003",)   # 72x72, 5 slices, 2 volumes
TRIO = tuple(DEMO_UPLOADS["siemens-trio"].split("/"))                         # 64x64, 35 slices, 2 volumes


def _tiles(ds: Dataset, n: int) -> list[np.ndarray]:
    """The n slices of a Siemens (square-grid) mosaic frame."""
    grid = math.ceil(math.sqrt(n))
    t_rows, t_cols = ds.Rows // grid, ds.Columns // grid
    a = ds.pixel_array
    return [a[(k // grid) * t_rows:(k // grid + 1) * t_rows, (k % grid) * t_cols:(k % grid + 1) * t_cols]
            for k in range(n)]


def as_uih(ds: Dataset, n: int, block: int = 0x10, keep: int | None = None, count: str | None = None) -> Dataset:
    """A Siemens mosaic of ``n`` slices in United Imaging's layout, its count in private block ``block``.

    ``keep`` keeps only the first slices (a grid UIH fills differently from Siemens); ``count``
    writes another value in the count element.
    """
    tiles = _tiles(ds, n)[:keep]
    n = len(tiles)
    across = math.ceil(math.sqrt(n))
    down = math.ceil(n / across)
    t_rows, t_cols = tiles[0].shape
    frame = np.zeros((down * t_rows, across * t_cols), tiles[0].dtype)
    for k, tile in enumerate(tiles):
        frame[(k // across) * t_rows:(k // across + 1) * t_rows, (k % across) * t_cols:(k % across + 1) * t_cols] = tile
    _no_private(ds)   # the Siemens private blocks go
    ds.Manufacturer = "UIH"
    ds.ImageType = [v for v in ds.ImageType if str(v).upper() != "MOSAIC"]
    ds.add_new((0x0065, block), "LO", "Image Private Header")
    try:
        ds.add_new((0x0065, (block << 8) | 0x50), "DS", str(n) if count is None else count)
    except ValueError:   # not a DS pydicom would write: the raw bytes, as a PACS may leave them
        ds.add_new((0x0065, (block << 8) | 0x50), "UN", count.encode())
    ds.Rows, ds.Columns = frame.shape
    ds.PixelData = frame.tobytes()
    return ds


def _headers(parts: tuple[str, ...], change) -> list[Dataset]:
    return [change(pydicom.dcmread(p)) for p in dicom_files(*parts)]


def _no_csa(ds: Dataset) -> Dataset:
    del ds[(0x0029, 0x1010)]
    return ds


def _no_private(ds: Dataset) -> Dataset:
    for elem in list(ds):
        if elem.tag.is_private:
            del ds[elem.tag]
    return ds


def _no_csa_un_count(ds: Dataset) -> Dataset:
    """Siemens' private count left as UN bytes (a little-endian US) by a PACS."""
    _no_csa(ds)
    ds[0x0019, 0x100A].VR, ds[0x0019, 0x100A].value = "UN", (35).to_bytes(2, "little")
    return ds


def _row_phase(ds: Dataset) -> Dataset:
    """The Trio mosaic without any count, its tiles cut to 48 columns, phase encoded along rows."""
    tiles = [t[:, :48] for t in _tiles(ds, 35)] + [np.zeros((64, 48), ds.pixel_array.dtype)]
    frame = np.block([[tiles[r * 6 + c] for c in range(6)] for r in range(6)])
    _no_private(ds)
    ds.Rows, ds.Columns = frame.shape
    ds.PixelData = frame.tobytes()
    ds.AcquisitionMatrix = [0, 64, 48, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    return ds


def _uih_typed(ds: Dataset) -> Dataset:
    as_uih(ds, 5)
    ds.ImageType = list(ds.ImageType) + ["MOSAIC"]
    return ds


@pytest.mark.parametrize("parts,change,expected", [
    (SIEMENS_NIH, lambda ds: as_uih(ds, 5), (72, 72, 5, 2)),
    (SIEMENS_NIH, lambda ds: as_uih(ds, 5, block=0x13), (72, 72, 5, 2)),   # a PACS moved the block
    (SIEMENS_NIH, _uih_typed, (72, 72, 5, 2)),         # UIH with a MOSAIC ImageType: still its own grid
    (TRIO, lambda ds: as_uih(ds, 35, keep=20), (64, 64, 20, 2)),   # UIH 5 across, 4 down; Siemens 5x5
    (TRIO, _no_csa, (64, 64, 35, 2)),                  # Siemens' private count without the CSA header
    (TRIO, _no_csa_un_count, (64, 64, 35, 2)),
    (TRIO, _no_private, (64, 64, 36, 2)),                # no count at all: 6x6 tiles, as dcm2niix counts
    (TRIO, _row_phase, (48, 64, 36, 2)),               # the same, non-square tiles, phase along rows
], ids=["uih-5", "uih-5-moved-block", "uih-5-typed", "uih-20", "siemens-no-csa", "siemens-un-count", "siemens-no-count",
        "siemens-no-count-row-phase"])
def test_a_mosaic_is_tabled_as_its_tiles(parts, change, expected):
    p = series_parameters(_headers(parts, change))
    assert (p["columns"], p["rows"], p["n_slices"], p["n_volumes"]) == expected


@pytest.mark.parametrize("count", ["inf", "1e400", "1e9", "abc", "-5", "1", "2.5", "17"])
def test_a_damaged_uih_count_is_no_mosaic_and_no_crash(count):
    """Not a number, infinite, absurd, fractional, or a grid the frame cannot hold as whole tiles
    (17 slices: 5 across, but the frame is 216 columns wide)."""
    headers = _headers(SIEMENS_NIH, lambda ds: as_uih(ds, 5, count=count))
    assert mosaic(headers[0]) is None
    p = series_parameters(headers)
    assert (p["columns"], p["rows"], p["n_slices"]) == (216, 144, 1)   # tabled as the flat frame it is


def test_a_count_left_as_un_bytes_is_read():
    def un(ds):
        as_uih(ds, 5)
        ds[0x0065, 0x1050].VR = "UN"
        ds[0x0065, 0x1050].value = b"5 "
        return ds
    assert mosaic(_headers(SIEMENS_NIH, un)[0]).slices == 5


def test_the_original_siemens_mosaics_are_unchanged():
    for parts, expected in ((SIEMENS_NIH, (72, 72, 5, 2)), (TRIO, (64, 64, 35, 2))):
        p = series_parameters(_headers(parts, lambda ds: ds))
        assert (p["columns"], p["rows"], p["n_slices"], p["n_volumes"]) == expected


def test_uih_grid_is_not_square():
    (ds, _) = _headers(SIEMENS_NIH, lambda ds: as_uih(ds, 5))
    m = mosaic(ds)
    assert (m.slices, m.tiles_across, m.tiles_down) == (5, 3, 2)


def test_a_uih_count_on_another_vendor_or_a_plain_image_is_no_mosaic():
    (ds, _) = _headers(SIEMENS_NIH, lambda ds: as_uih(ds, 5))
    ds.Manufacturer = "GE MEDICAL SYSTEMS"           # the element means something else elsewhere
    assert mosaic(ds) is None
    ge = pydicom.dcmread(dicom_files("dcm_qa_nih", "In", "20180918GE", "mr_0004")[0])
    ge.Manufacturer = "UIH"
    assert mosaic(ge) is None                        # a UIH image without the count is a plain image
    ge.add_new((0x0065, 0x0010), "LO", "Image Private Header")
    ge.add_new((0x0065, 0x1050), "DS", "1")
    assert mosaic(ge) is None                        # nor with a count of one


def test_a_uih_mosaic_is_received_and_converted_to_the_siemens_voxels(tmp_path, trial):
    up = copy_upload(tmp_path / "up", *SIEMENS_NIH)
    for p in sorted(up.iterdir()):
        as_uih(pydicom.dcmread(p), 5).save_as(p)
    lake = Lake(str(tmp_path / "lake")).init()
    o = receive_one_study(Upload(trial, "siemens-nih", "u1", lake), inventory_upload(up).accepted)
    record_study(lake, o, o.matcher)
    row = read_table(lake, "series").iloc[0]
    assert (row.columns, row.rows, row.n_slices, row.n_volumes) == (72, 72, 5, 2)
    deid = [pydicom.dcmread(lake.path(p)) for p in lake.find("deid") if p.endswith(".dcm")]
    assert len(deid) == 2 and all(mosaic(ds).slices == 5 for ds in deid)   # the count survives de-identification
    images, findings = convert_study(lake, trial, o.study)
    assert [f.reason_code for f in findings] == []
    (image,) = images.values()
    out = nib.load(lake.path(image))
    ref = nib.load(shared_path("dcm_qa_nih", "Ref", "EPI_PE=AP_3.nii"))
    # The voxels equal the original Siemens mosaic's. The position is not compared: a Siemens
    # mosaic's ImagePositionPatient is the corner of the whole frame, which dcm2niix corrects for
    # Siemens only, and the transformation keeps Siemens' value.
    assert out.shape == ref.shape == (72, 72, 5, 2)
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(ref.dataobj))
