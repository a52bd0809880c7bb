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


def _mosaic_slices(ds: Dataset) -> int | None:
    """Slices packed in a Siemens mosaic (CSA image header, read by nibabel)."""
    if "MOSAIC" not in [str(v).upper() for v in ds.get("ImageType", [])]:
        return None
    try:
        with warnings.catch_warnings():  # nibabel calls its DICOM readers experimental
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

        csa = csareader.get_csa_header(ds, "image")
        n = csareader.get_n_mosaic(csa) if csa else None
    except Exception:  # a malformed CSA header only costs us the slice count
        return None
    return int(n) if n else None


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
    mosaic = _mosaic_slices(first)
    if mosaic:
        n_slices, n_volumes = mosaic, len(headers)
        # A mosaic packs ceil(sqrt(n)) x ceil(sqrt(n)) tiles; the matrix is one tile.
        tiles = math.ceil(math.sqrt(mosaic))
        params["rows"] = params["rows"] // tiles if params["rows"] else None
        params["columns"] = params["columns"] // tiles if params["columns"] else None
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
