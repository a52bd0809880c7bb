"""Acquisition parameters of an MR series, read from classic and enhanced DICOM.

Classic MR Image Storage keeps TR/TE/flip angle at the top level of every
file. Enhanced MR Image Storage (one multi-frame file) keeps them in
functional group sequences: TR and flip angle in the shared
MRTimingAndRelatedParametersSequence, TE in MREchoSequence (usually per
frame), TI in MRModifierSequence.InversionTimes, thickness and spacing in
PixelMeasuresSequence (PS3.3 C.8.13 and C.7.6.16). :func:`series_parameters`
hides that difference behind one flat dict of canonical names and units
(the names TrialConfig tolerances use).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
        if value is None:
            return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _functional(ds: Dataset, sequence: str, keyword: str) -> Any:
    """A value from the shared, else the first per-frame, functional group."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if not seq:
            continue
        item = seq[0].get(sequence)
        if item and keyword in item[0]:
            return item[0].get(keyword)
    return None


def is_enhanced(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) == ENHANCED_MR


def acquisition_parameters(ds: Dataset) -> dict[str, Any]:
    """Per-file parameters (the series' first file stands for the series)."""
    if is_enhanced(ds):
        tr = _functional(ds, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
        fa = _functional(ds, "MRTimingAndRelatedParametersSequence", "FlipAngle")
        te = _functional(ds, "MREchoSequence", "EffectiveEchoTime")
        ti = _functional(ds, "MRModifierSequence", "InversionTimes")
        thick = _functional(ds, "PixelMeasuresSequence", "SliceThickness")
        spacing = _functional(ds, "PixelMeasuresSequence", "PixelSpacing")
    else:
        tr, te, ti, fa = (ds.get(k) for k in ("RepetitionTime", "EchoTime", "InversionTime", "FlipAngle"))
        thick, spacing = ds.get("SliceThickness"), ds.get("PixelSpacing")
    spacing = list(spacing) if spacing else [None, None]
    return {
        "field_strength": _num(ds.get("MagneticFieldStrength")),
        "repetition_time": _num(tr),
        "echo_time": _num(te),
        "inversion_time": _num(ti),
        "flip_angle": _num(fa),
        "slice_thickness": _num(thick),
        "pixel_spacing_row": _num(spacing[0]),
        "pixel_spacing_col": _num(spacing[1]) if len(spacing) > 1 else None,
        "rows": int(ds.Rows) if "Rows" in ds else None,
        "columns": int(ds.Columns) if "Columns" in ds else None,
        "mr_acquisition_type": str(ds.get("MRAcquisitionType", "") or "") or None,
    }


def scanner_identity(ds: Dataset) -> dict[str, str | None]:
    sw = ds.get("SoftwareVersions")
    if sw is not None and not isinstance(sw, str):
        sw = "\\".join(str(v) for v in sw)
    return {
        "manufacturer": str(ds.get("Manufacturer", "") or "") or None,
        "model": str(ds.get("ManufacturerModelName", "") or "") or None,
        "device_serial": str(ds.get("DeviceSerialNumber", "") or "") or None,
        "software_versions": (sw or None),
    }


@dataclass(frozen=True)
class Mosaic:
    """Slices packed as tiles in one frame, and the tile grid they fill."""

    slices: int
    tiles_across: int   # tiles in one row of the frame (divides Columns)
    tiles_down: int     # rows of tiles (divides Rows)


#: Private elements that count a mosaic's slices, found by their block's creator (a PACS may move
#: the block): Siemens' NumberOfImagesInMosaic (US) and United Imaging's number of images in the
#: grid (DS), the two dcm2niix reads (console/nii_dicom.cpp).
SIEMENS_MOSAIC_COUNT = ("SIEMENS MR HEADER", 0x0019, 0x0A, "US")
UIH_MOSAIC_COUNT = ("Image Private Header", 0x0065, 0x50, "DS")
#: More tiles than this in one frame is a damaged count, not a mosaic.
MAX_MOSAIC_SLICES = 1024


def _private_count(ds: Dataset, creator: str, group: int, offset: int, vr: str) -> float | None:
    """A private count of its vendor's VR (US or DS), also when a PACS left it as UN bytes."""
    try:
        value = ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError):
        return None
    if isinstance(value, bytes):   # UN, in the vendor's VR
        value = (int.from_bytes(value, "little") if len(value) == 2 else None) if vr == "US" \
            else value.decode("ascii", "replace")
    return _num(value)


def _is_uih(ds: Dataset) -> bool:
    """United Imaging, as dcm2niix tells it: a Manufacturer beginning with UI."""
    return str(ds.get("Manufacturer", "") or "").strip().upper().startswith("UI")


def _csa_mosaic(ds: Dataset) -> int | None:
    """Slices of a Siemens mosaic from the CSA image header (read by nibabel)."""
    try:
        with warnings.catch_warnings():  # nibabel calls its DICOM readers experimental
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

        csa = csareader.get_csa_header(ds, "image")
        n = csareader.get_n_mosaic(csa) if csa else None
    except Exception:  # a malformed CSA header only costs us this source of the count
        return None
    return int(n) if n else None


def _matrix_tiles(ds: Dataset, rows: int, columns: int) -> int | None:
    """Tiles of a MOSAIC frame from AcquisitionMatrix, when nothing counts its slices.

    dcm2niix's fallback for a mosaic of unknown count: (Columns / frequency rows) x (Rows /
    phase lines), each an exact ratio above 2.
    """
    try:
        am = [int(v) for v in (ds.get("AcquisitionMatrix") or [])]
    except (TypeError, ValueError):
        return None
    if len(am) != 4:
        return None
    # frequency rows\frequency columns\phase rows\phase columns: two are 0, the others the
    # tile's size along the frame's columns and rows (whichever way the phase runs)
    tile_cols, tile_rows = am[0] or am[2], am[1] or am[3]
    if tile_cols <= 0 or tile_rows <= 0 or columns % tile_cols or rows % tile_rows:
        return None
    across, down = columns // tile_cols, rows // tile_rows
    return down * across if down > 2 and across > 2 else None


def mosaic(ds: Dataset) -> Mosaic | None:
    """The mosaic layout of a classic MR frame, from any vendor that writes one; None if it is not.

    The slice count comes from the vendor's own element (Siemens CSA header or private
    NumberOfImagesInMosaic; United Imaging's grid count, which it writes without a MOSAIC
    ImageType), else from AcquisitionMatrix for an ImageType MOSAIC frame. Siemens fills a
    square grid (ceil(sqrt(n)) tiles each way); United Imaging ceil(sqrt(n)) across and only
    as many rows as the slices need (dcm2niix's nii_demosaic, its issue 225).
    """
    try:
        if is_enhanced(ds) or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return None
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    typed = "MOSAIC" in [str(v).upper() for v in ds.get("ImageType", [])]
    uih = _is_uih(ds)
    n = _private_count(ds, *UIH_MOSAIC_COUNT) if uih else None
    if not n and typed:
        n = _csa_mosaic(ds) or _private_count(ds, *SIEMENS_MOSAIC_COUNT) or _matrix_tiles(ds, rows, columns)
    if not n or not 2 <= n <= MAX_MOSAIC_SLICES or n != int(n):
        return None
    n = int(n)
    across = math.ceil(math.sqrt(n))
    down = math.ceil(n / across) if uih else across
    if columns % across or rows % down:   # a count the frame cannot hold as whole tiles
        return None
    return Mosaic(n, across, down)


def _positions(ds: Dataset) -> list[tuple[float, ...]]:
    if is_enhanced(ds):
        out = []
        for item in ds.get("PerFrameFunctionalGroupsSequence", []):
            pp = item.get("PlanePositionSequence")
            if pp and "ImagePositionPatient" in pp[0]:
                out.append(tuple(round(float(v), 3) for v in pp[0].ImagePositionPatient))
        return out
    ipp = ds.get("ImagePositionPatient")
    return [tuple(round(float(v), 3) for v in ipp)] if ipp else []


def series_parameters(headers: Sequence[Dataset]) -> dict[str, Any]:
    """Parameters of one series from the headers of all its files.

    Adds to :func:`acquisition_parameters` of the first file: ``n_slices``,
    ``n_volumes`` and ``coverage_mm`` (slice count times slice spacing), which
    need every file (or every frame of an enhanced file).
    """
    if not headers:
        raise ValueError("a series needs at least one file")
    first = headers[0]
    params = acquisition_parameters(first)
    tiles = mosaic(first)
    if tiles:
        n_slices, n_volumes = tiles.slices, len(headers)   # one file per volume; the matrix is one tile
        params["rows"] = params["rows"] // tiles.tiles_down if params["rows"] else None
        params["columns"] = params["columns"] // tiles.tiles_across if params["columns"] else None
    else:
        positions = [p for ds in headers for p in _positions(ds)]
        n_images = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)
        n_slices = len(set(positions)) or n_images
        n_volumes = max(1, n_images // n_slices) if n_slices else 1
    between = (_functional(first, "PixelMeasuresSequence", "SpacingBetweenSlices")
               if is_enhanced(first) else first.get("SpacingBetweenSlices"))
    spacing = _num(between) or params["slice_thickness"]
    params.update(
        n_slices=n_slices,
        n_volumes=n_volumes,
        coverage_mm=(n_slices * spacing) if (n_slices and spacing) else None,
        pixel_spacing=params["pixel_spacing_row"],
    )
    return params


def _temporal_indices(ds: Dataset) -> list[int]:
    """The temporal position of each frame (enhanced: FrameContentSequence's TemporalPositionIndex)
    or of the file (classic: TemporalPositionIdentifier); [] when the header gives none."""
    if is_enhanced(ds):
        out = []
        for item in ds.get("PerFrameFunctionalGroupsSequence", []):
            fc = item.get("FrameContentSequence")
            if not fc or fc[0].get("TemporalPositionIndex") is None:
                return []
            out.append(int(fc[0].TemporalPositionIndex))
        return out
    value = ds.get("TemporalPositionIdentifier")
    return [int(value)] if value not in (None, "") else []


def series_gaps(headers: Sequence[Dataset]) -> str | None:
    """What a series lacks that its own headers promise, or None: volumes missing from the
    NumberOfTemporalPositions (0020,0105) it states, or volumes with fewer slices than the others.

    A series whose headers state no temporal positions (most 3D anatomy, Siemens mosaics) is
    judged complete here; the protocol's n_volumes and the media's DICOMDIR still apply.
    """
    promised = max((_int_or_0(ds.get("NumberOfTemporalPositions")) for ds in headers), default=0)
    frames: dict[int, int] = {}
    for ds in headers:
        indices = _temporal_indices(ds)
        if not indices:
            return _position_gaps(headers, promised)
        for i in indices:
            frames[i] = frames.get(i, 0) + 1
    if promised > 1:
        absent = sorted(set(range(1, promised + 1)) - set(frames))
        if absent:
            shown = ", ".join(map(str, absent[:10])) + (" ..." if len(absent) > 10 else "")
            return (f"{len(absent)} of the {promised} volumes its headers promise (NumberOfTemporalPositions) "
                    f"did not arrive: volume(s) {shown}")
    full = max(frames.values(), default=0)
    short = sorted(i for i, n in frames.items() if n < full)
    if short:
        return (f"volume(s) {', '.join(map(str, short[:10]))} have fewer slices than the others "
                f"({min(frames[i] for i in short)} of {full})")
    return None


def _position_gaps(headers: Sequence[Dataset], promised: int) -> str | None:
    """Without temporal indices (GE writes none): each slice position must hold ``promised`` images."""
    if promised <= 1 or mosaic(headers[0]):
        return None
    counts: dict[tuple[float, ...], int] = {}
    for ds in headers:
        for p in _positions(ds):
            counts[p] = counts.get(p, 0) + 1
    short = [n for n in counts.values() if n < promised]
    if not counts or not short:
        return None
    return (f"{len(short)} of its {len(counts)} slice positions hold fewer than the {promised} images its headers "
            f"promise (NumberOfTemporalPositions): {promised - min(short)} volume(s) lack slices")


def _int_or_0(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
