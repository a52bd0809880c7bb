"""A cheap walk over a DICOM data set that converts only the elements asked for.

pydicom parses element values lazily; touching every element (``iterall``)
converts all of them, which on a GE slice with ~250 private elements costs more
than reading the file. De-identification and PHI verification only need a few
value representations (dates, UIDs, names) and the sequences that may hold
them, so this walk reads the VR from the raw element and converts nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

UNDEFINED_LENGTH = 0xFFFFFFFF


def raw_vr(tag: int, raw: object) -> str:
    """The VR of a (possibly raw) element without converting its value."""
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def maybe_sequence(vr: str, raw: object) -> bool:
    return vr == "SQ" or (vr == "UN" and getattr(raw, "length", 0) == UNDEFINED_LENGTH)


def walk(ds: Dataset, vrs: frozenset[str], tags: frozenset[int] = frozenset()) -> Iterator[DataElement]:
    """Every element (at any depth) whose VR is in ``vrs`` or whose tag is in ``tags``."""
    for tag, raw in list(ds.items()):  # items() hands out raw elements unconverted
        vr = raw_vr(tag, raw)
        if maybe_sequence(vr, raw):
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from walk(item, vrs, tags)
                continue
        if vr in vrs or tag in tags:
            yield ds[tag]
