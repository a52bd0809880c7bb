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


def raw_vr(ds: Dataset, tag: int) -> str:
    """The VR of an element without converting its value."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def walk(ds: Dataset, vrs: frozenset[str], tags: frozenset[int] = frozenset()) -> Iterator[DataElement]:
    """Every element (at any depth) whose VR is in ``vrs`` or whose tag is in ``tags``."""
    for tag in list(ds.keys()):
        vr = raw_vr(ds, tag)
        raw = ds.get_item(tag)
        maybe_seq = vr == "SQ" or (vr == "UN" and getattr(raw, "length", 0) == UNDEFINED_LENGTH)
        if maybe_seq:
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from walk(item, vrs, tags)
                continue
        if vr in vrs or int(tag) in tags:
            yield ds[tag]
