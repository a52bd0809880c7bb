"""Images a scanner derived from an acquisition, found in the acquisition's own series.

Scanners put computed images into the series they come from: Philips adds the isotropic
(trace) diffusion image and an ADC map to a DTI series, GE and Siemens add TRACEW, ADC or FA
maps, MPR reformats. They are not acquired volumes: a converter makes a second image of them
("img" and "img_ADC"), and counting them as volumes miscounts the acquisition (17 for 16).

A file is derived when its ImageType (0008,0008) says DERIVED, or names a computed map
(ADC, TRACEW, FA, ISOTROPIC...), or its diffusion directionality is ISOTROPIC (the standard
(0018,9075), or Philips' private DiffusionDirection "I", found by its private creator
"Philips Imaging DD 001", not by element number). Only a series that mixes derived and acquired
files is split: a series that is all derived (an ADC series of its own) is that series.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from tasks.intake.inventory import ReceivedFile

#: ImageType values (from the third on) that name a computed image, across vendors.
DERIVED_TYPES = frozenset({"ADC", "EADC", "TRACEW", "TRACE", "FA", "ISOTROPIC", "ISO", "EXP", "CALC_BVALUE",
                           "MPR", "MIP", "PROJECTION IMAGE", "SUBTRACTION", "COLFA", "TENSOR"})
PHILIPS_DD = "Philips Imaging DD 001"


def derived_reason(ds: Dataset) -> str | None:
    """Why a file is a derived image (quoted from its header), or None for an acquired one."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])] if "ImageType" in ds else []
    shown = "\\".join(image_type)
    if image_type and image_type[0] == "DERIVED":
        return f"ImageType {shown}"
    named = sorted(set(image_type[2:]) & DERIVED_TYPES)
    if named:
        return f"ImageType {shown} names a computed image ({', '.join(named)})"
    if str(ds.get("DiffusionDirectionality", "")).upper() == "ISOTROPIC":
        return "DiffusionDirectionality ISOTROPIC (a trace image)"
    if _philips_direction(ds) == "I":
        return f"Philips DiffusionDirection I (isotropic, a trace image; private block {PHILIPS_DD!r})"
    return None


def _philips_direction(ds: Dataset) -> str | None:
    try:
        block = ds.private_block(0x2001, PHILIPS_DD)
    except KeyError:
        return None
    if 0x04 not in block:
        return None
    value = block[0x04].value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip().upper() or None


def split_derived(members: list[ReceivedFile]) -> tuple[list[ReceivedFile], list[tuple[ReceivedFile, str]]]:
    """(acquired, [(derived, reason)]) of one series' files; nothing is split from an all-derived series."""
    reasons = [derived_reason(m.header) for m in members]
    if all(reasons) or not any(reasons):
        return list(members), []
    return ([m for m, r in zip(members, reasons) if not r],
            [(m, r) for m, r in zip(members, reasons) if r])
