"""Independent proof that no identifying value left the restricted stores.

This module shares no code with :mod:`tasks.deid` on purpose: it collects the
original identifying values from the received headers by its own rules and
searches the bytes of every output for them (DICOM files whole, Parquet and
gzip decoded first, since compression would hide a value from a byte search),
plus every output's file name. A hit fails closed: the caller quarantines
the series instead of writing it to ``deid/``.

Short values cannot be searched blindly in binary data ("DEV" occurs by chance
in pixel noise). So values of five or more characters are searched
everywhere, case-insensitively; values of three or four characters are
searched as whole words outside pixel data; shorter ones ("1", "M") cannot
identify anyone by content and are reported as not verifiable by content.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom._uid_dict import UID_dictionary

from tasks.dicom_walk import walk

IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
    "MilitaryRank", "EthnicGroup", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "AccessionNumber", "StudyID", "AdmissionID", "IssuerOfPatientID",
)
DEVICE_KEYWORDS = ("DeviceSerialNumber", "StationName")
PERSON_KEYWORDS = {"PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                   "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                   "NameOfPhysiciansReadingStudy", "RequestingPhysician"}
ADDRESS_KEYWORDS = {"PatientAddress", "InstitutionAddress", "ReferringPhysicianAddress"}
LONG, SHORT = 5, 3
PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"


@dataclass(frozen=True)
class Identifier:
    source: str    # where it came from, e.g. "PatientName" or "StudyDate (unshifted)"
    value: str


@dataclass(frozen=True)
class Leak:
    output: str     # lake path or file name of the output
    source: str     # which kind of identifier (never the value itself)
    where: str      # "content at byte N" or "file name"

    def __str__(self) -> str:
        return f"{self.output}: {self.source} found in {self.where}"


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]


def _pieces(kw: str, value: str) -> set[Identifier]:
    """A value and the parts of it that identify on their own.

    Person names are also searched by component (family, given). Addresses are
    searched by comma-separated part (street, city, postcode). Institution
    names only whole: their words ("Center", "Medical") occur in any header.
    """
    out = {Identifier(kw, value)}
    if kw in PERSON_KEYWORDS:
        out.update(Identifier(f"{kw} component", p) for p in re.split(r"[\^=\s,]+", value)
                   if len(p) >= SHORT and p != value)
    elif kw in ADDRESS_KEYWORDS:
        out.update(Identifier(f"{kw} part", p.strip(" -")) for p in value.split(",")
                   if len(p.strip(" -")) >= LONG and p != value)
    return out


def collect_identifiers(headers: Iterable[Dataset], retain_device_identity: bool = True) -> list[Identifier]:
    """The original identifying values of a set of received headers.

    Names (and their components), IDs, birth date, addresses, institution,
    physicians, accession, study ID, every date (as YYYYMMDD and YYYY-MM-DD),
    every non-standard UID, and the device identity unless it is retained.
    """
    keywords = IDENTIFYING_KEYWORDS + (() if retain_device_identity else DEVICE_KEYWORDS)
    found: set[Identifier] = set()
    for ds in headers:
        for kw in keywords:
            for v in _values(ds.get(kw)):
                if v.strip():
                    found |= _pieces(kw, v.strip())
        for elem in walk(ds, frozenset({"DA", "DT", "UI"})):
            for v in _values(elem.value):
                if elem.VR == "UI":
                    if v and v not in UID_dictionary:
                        found.add(Identifier(f"{elem.keyword or 'UID'} (original)", v))
                elif len(v) >= 8 and v[:8].isdigit():
                    d, src = v[:8], f"{elem.keyword or 'date'} (unshifted)"
                    found |= {Identifier(src, d), Identifier(src, f"{d[:4]}-{d[4:6]}-{d[6:8]}")}
    return sorted(found, key=lambda i: (i.source, i.value))


class Matcher:
    """Compiled searches for one set of identifiers.

    ``own_labels`` are corelab's own words (trial id, site id, subject label):
    an identifier component equal to one of their tokens (the "nih" of both
    InstitutionName "NIH FMRIF" and site "ge-nih") cannot be told apart from
    them by content, so it is listed in ``not_verifiable`` instead of searched.
    """

    def __init__(self, identifiers: Iterable[Identifier], own_labels: Iterable[str] = ()):
        identifiers = list(identifiers)
        own = {t for label in own_labels for t in re.split(r"[^a-z0-9]+", label.lower()) if t}
        clash = [i for i in identifiers if i.value.lower() in own]
        identifiers = [i for i in identifiers if i.value.lower() not in own]
        ids = [i for i in identifiers if len(i.value) >= SHORT]
        self.too_short = sorted({i.source for i in identifiers if len(i.value) < SHORT})
        self.not_verifiable = sorted({i.source for i in clash} | set(self.too_short))
        self._by_value: dict[bytes, str] = {}
        longs, shorts = [], []
        for i in ids:
            key = i.value.lower().encode("utf-8", "replace")
            self._by_value.setdefault(key, i.source)
            (longs if len(i.value) >= LONG else shorts).append(key)
        self._long = _alternation(longs, word=False)
        self._short = _alternation(shorts, word=True)
        self._any_word = _alternation(longs + shorts, word=True)

    def in_content(self, data: bytes, header_end: int | None = None) -> list[tuple[str, int]]:
        low = data.lower()
        hits = []
        if self._long:
            hits += [(self._by_value[m.group(0)], m.start()) for m in self._long.finditer(low)]
        if self._short:
            region = low if header_end is None else low[:header_end]
            hits += [(self._by_value[m.group(1)], m.start(1)) for m in self._short.finditer(region)]
        return hits

    def in_name(self, name: str) -> list[str]:
        if not self._any_word:
            return []
        low = name.lower().encode("utf-8", "replace")
        # file names are short: a value anywhere in one is a leak, word or not
        hits = [self._by_value[m.group(1)] for m in self._any_word.finditer(low)]
        hits += [src for val, src in self._by_value.items() if len(val) >= LONG and val in low]
        return sorted(set(hits))


def _alternation(values: list[bytes], word: bool) -> re.Pattern[bytes] | None:
    if not values:
        return None
    body = b"|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True))
    if word:
        return re.compile(rb"(?<![a-z0-9])(" + body + rb")(?![a-z0-9])")
    return re.compile(body)


def decoded(name: str, data: bytes) -> tuple[bytes, int | None]:
    """Searchable bytes of an output, and where a DICOM header ends (if DICOM)."""
    if name.endswith(".gz"):
        data = gzip.decompress(data)
        name = name[:-3]
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        meta = json.dumps({k.decode(): v.decode("utf-8", "replace")
                           for k, v in (table.schema.metadata or {}).items()})
        return (json.dumps(table.to_pylist(), default=str) + meta).encode(), None
    if data[128:132] == b"DICM":
        pos = data.rfind(PIXEL_TAG_LE)
        return data, (pos if pos > 0 else None)
    return data, None


def find_leaks(name: str, data: bytes, matcher: Matcher) -> list[Leak]:
    """Every identifying value in an output's content or name."""
    leaks = [Leak(name, src, "file name") for src in matcher.in_name(name)]
    content, header_end = decoded(name, data)
    leaks += [Leak(name, src, f"content at byte {pos}")
              for src, pos in matcher.in_content(content, header_end)]
    return leaks
