"""Independent proof that no identifying value left the restricted stores.

This module shares no code with :mod:`tasks.deid.profile` on purpose: it collects the
original identifying values from the received headers by its own rules and
searches the bytes of every output for them (DICOM files whole, Parquet and
gzip decoded first, since compression would hide a value from a byte search),
plus every output's file name. A hit fails closed: the caller quarantines
the series instead of writing it to ``deid/``.

Short values cannot be searched blindly in binary data ("DEV" occurs by chance in pixel
noise). So values of five or more characters are searched everywhere, case-insensitively and
inside any text (``smith`` in ``JohnSmith_T1``); values of three or four characters are searched
as whole words outside pixel data; shorter ones ("1", "M") cannot identify anyone by content
and are reported as not verifiable by content.

Three kinds of span are not searched inside: the words our own software writes
(:data:`OWN_WORDS`: the name ``dicom`` is not "found" in ``pydicom``, nor a name component
``dcm2niix`` in a sidecar's ConversionSoftware), JSON object keys
(``"ImageOrientationPatientDICOM":``), and the values the trial keeps on purpose (the device
identity and class), for identifiers that are not the patient's (an InstitutionName ``orange``
inside the serial ``0000000000orange``). A patient's name, ID or date found inside a kept value
is still a leak.
An identifier equal to one of our words is also listed as not verifiable by content.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tasks.deid.walk import walk
from tasks.errors import CorelabError
from tasks.intake.placeholders import is_placeholder

IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
    "MilitaryRank", "EthnicGroup", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "AccessionNumber", "StudyID", "AdmissionID", "IssuerOfPatientID",
)
DEVICE_KEYWORDS = ("DeviceSerialNumber", "StationName")
# Kept by every profile (what kind of device, which sequence): collected here by this module's
# own list, as the profile keeps them by its own (tasks.deid.profile.DEVICE_CLASS_KEYWORDS).
DEVICE_CLASS_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SequenceName",
                         "PulseSequenceName", "TransmitCoilName", "ReceiveCoilName")
PERSON_KEYWORDS = {"PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                   "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                   "NameOfPhysiciansReadingStudy", "RequestingPhysician"}
ADDRESS_KEYWORDS = {"PatientAddress", "InstitutionAddress", "ReferringPhysicianAddress"}
LONG, SHORT = 5, 3
PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"
# Words our own outputs carry in keys and values, as whole tokens: the software that wrote them
# (sidecars' ConversionSoftware, Parquet's "created_by" and pandas metadata, GeneratedBy, the
# DeidentificationMethod text) and the formats they name. Only software names: a word that is
# also a surname would stop that surname being searched where it stands.
OWN_WORDS = frozenset({
    "corelab", "dcm2niix", "pydicom", "dicom", "nifti", "nibabel", "numpy", "pandas", "pyarrow",
    "parquet-cpp-arrow", "parquet", "prefect", "simpleitk", "antspyx", "dipy", "nilearn", "nipype",
    "neuroharmonize", "neurocombat", "bids",
})
_OWN = re.compile(rb"(?<![a-z0-9])(?:" + b"|".join(re.escape(w.encode()) for w in
                                                   sorted(OWN_WORDS, key=len, reverse=True)) + rb")(?![a-z0-9])")
# A JSON object key: the keys of every sidecar and table row are names our software (or
# dcm2niix) chose, such as "ImageOrientationPatientDICOM"; values are what is searched.
_JSON_KEY = re.compile(rb'"[a-z0-9_]{1,64}"(?=\s*:)')
PATIENT_SOURCES = ("Patient", "OtherPatient")   # identifiers a kept device value never excuses
# A hash our own software wrote (sha256 prefixes in file and folder names, upload and study keys,
# checksums in tables): 8 or more hex characters with a letter and a digit, standing alone. A
# value found strictly inside one is a coincidence of the hash's digits: the virtual trial lost a
# whole series because the name of one de-identified file, 00062-0b75a27018f9.dcm, holds the
# digit run 27018, the GE exam's StudyID (about 1 series in 40 with a 5-digit StudyID and 70
# files a series). A value that is the whole token is still found.
_HASH = re.compile(rb"(?<![0-9a-z])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{8,}(?![0-9a-z])")


def masked_spans(low: bytes) -> list[tuple[int, int]]:
    """Where our own words, JSON keys and hashes stand in ``low`` (lower-cased bytes).

    A hash gives two spans, each one character short of it (start to end - 1, start + 1 to end):
    a hit shorter than the hash lies in one of them, a hit that is the whole hash in neither.
    """
    hashes = [span for m in _HASH.finditer(low) for span in ((m.start(), m.end() - 1), (m.start() + 1, m.end()))]
    return [m.span() for m in _OWN.finditer(low)] + [m.span() for m in _JSON_KEY.finditer(low)] + hashes


def excused(source: str, pos: int, n: int, own: list[tuple[int, int]], kept: list[tuple[int, int]]) -> bool:
    """A hit inside one of our words, or (not for a patient's identifier) inside a kept value."""
    inside = lambda spans: any(a <= pos and pos + n <= b for a, b in spans)  # noqa: E731
    return inside(own) or (not source.startswith(PATIENT_SOURCES) and inside(kept))


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
    # Only true multi-values are lists: a PersonName iterates over its characters.
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _pieces(kw: str, value: str) -> set[Identifier]:
    """A value and the parts of it that identify on their own.

    Person names are also searched by component (family, given). Addresses are
    searched by comma-separated part (street, city, postcode). Institution
    names only whole: their words ("Center", "Medical") occur in any header.
    """
    if is_placeholder(value):
        return set()
    out = {Identifier(kw, value)}
    if kw in PERSON_KEYWORDS:
        out.update(Identifier(f"{kw} component", p) for p in re.split(r"[\^=\s,]+", value)
                   if len(p) >= SHORT and p != value and not is_placeholder(p))
    elif kw in ADDRESS_KEYWORDS:
        out.update(Identifier(f"{kw} part", p.strip(" -")) for p in value.split(",")
                   if len(p.strip(" -")) >= LONG and p != value and not is_placeholder(p))
    return out


def retained_values(headers: Iterable[Dataset], retain_device_identity: bool) -> list[str]:
    """Values every output keeps on purpose: the device class, and the device identity when retained."""
    keywords = DEVICE_CLASS_KEYWORDS + (DEVICE_KEYWORDS if retain_device_identity else ())
    return sorted({v.strip() for ds in headers for kw in keywords for v in _values(ds.get(kw)) if v.strip()})


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
                elif len(v) >= 8 and _is_date(v[:8]):
                    d, src = v[:8], f"{elem.keyword or 'date'} (unshifted)"
                    found |= {Identifier(src, d), Identifier(src, f"{d[:4]}-{d[4:6]}-{d[6:8]}")}
    return sorted(found, key=lambda i: (i.source, i.value))


def _is_date(text: str) -> bool:
    """Eight digits that are a calendar date (``00000000`` stands where a date was left out)."""
    try:
        datetime.strptime(text, "%Y%m%d")
        return True
    except ValueError:
        return False


UID_TOKEN = re.compile(rb"[0-9]+(?:\.[0-9]+)+")
DIGIT_RUN = re.compile(rb"[0-9]+")


class Matcher:
    """Searches for one study's identifiers, fast enough for every output byte.

    Thousands of UIDs and a few dates cannot be searched one regex alternative
    at a time, so numbers are found by their shape and looked up: every
    dotted-number token (and each run of its components) against the original
    UIDs, every window of every digit run against the dates and long numbers,
    short numbers only as whole digit runs. The few values with letters (names,
    IDs, addresses) are one regular expression.

    ``own_labels`` are corelab's own words (trial id, site id, subject label):
    an identifier component equal to one of their tokens (the "nih" of both
    InstitutionName "NIH FMRIF" and site "ge-nih") cannot be told apart from
    them by content, so it is listed in ``not_verifiable`` instead of searched.

    ``retained`` are values the trial keeps on purpose (the device identity under
    Retain Device Identity): an identifier found inside one of them (InstitutionName
    "orange" in DeviceSerialNumber "0000000000orange") is that value, not a leak.
    """

    def __init__(self, identifiers: Iterable[Identifier], own_labels: Iterable[str] = (),
                 retained: Iterable[str] = ()):
        identifiers = list(identifiers)
        own = {t for label in own_labels for t in re.split(r"[^a-z0-9]+", label.lower()) if t}
        clash = {i.source for i in identifiers if i.value.lower() in own}
        software = {i.source for i in identifiers if i.value.lower() in OWN_WORDS}  # searched, but not in our words
        ids = [i for i in identifiers if i.value.lower() not in own and len(i.value) >= SHORT]
        self.not_verifiable = sorted(clash | software | {i.source for i in identifiers if len(i.value) < SHORT})
        self.source: dict[bytes, str] = {}
        for i in ids:
            self.source.setdefault(i.value.lower().encode("utf-8", "replace"), i.source)
        values = list(self.source)
        self.uids = {v for v in values if UID_TOKEN.fullmatch(v)}
        self.numbers = {v for v in values if v.isdigit()}
        self.windows = sorted({len(v) for v in self.numbers if len(v) >= 8})
        text = [v for v in values if v not in self.uids and v not in self.numbers]
        self._long = _alternation([v for v in text if len(v) >= LONG], word=False)
        self._short = _alternation([v for v in text if len(v) < LONG], word=True)
        self._any_word = _alternation(text, word=True)
        self.retained = sorted({r.strip().lower().encode("utf-8", "replace") for r in retained
                                if len(r.strip()) >= SHORT and not is_placeholder(r)})
        self._retained = _alternation(self.retained, word=False)

    def _not_excused(self, low: bytes, hits: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        """The hits that are not inside our own words or (for non-patient identifiers) a kept value."""
        if not hits:
            return hits
        own = masked_spans(low)
        kept = [m.span() for m in self._retained.finditer(low)] if self._retained is not None else []
        return [(v, pos) for v, pos in hits if not excused(self.source[v], pos, len(v), own, kept)]

    def _numbers_in(self, low: bytes) -> list[tuple[bytes, int]]:
        # Each distinct token and digit run is looked up once: pixel data and
        # numeric headers repeat the same short runs thousands of times.
        tokens = {t: self._uids_in_token(t) for t in set(UID_TOKEN.findall(low))}
        runs = {r: self._numbers_in_run(r) for r in set(DIGIT_RUN.findall(low))}
        if not any(tokens.values()) and not any(runs.values()):
            return []
        hits = [(c, m.start()) for m in UID_TOKEN.finditer(low) for c in tokens[m.group(0)]]
        return hits + [(v, m.start() + k) for m in DIGIT_RUN.finditer(low) for v, k in runs[m.group(0)]]

    def _uids_in_token(self, token: bytes) -> list[bytes]:
        """Original UIDs equal to the token or to a run of its dot-separated components."""
        parts = token.split(b".")
        cands = (b".".join(parts[a:b]) for a in range(len(parts)) for b in range(a + 2, len(parts) + 1))
        return [c for c in cands if c in self.uids]

    def _numbers_in_run(self, run: bytes) -> list[tuple[bytes, int]]:
        """Numbers equal to a digit run, or (dates, long numbers) inside it, with their offsets."""
        hits = [(run, 0)] if run in self.numbers else []
        for w in self.windows:
            hits += [(run[k:k + w], k) for k in range(len(run) - w + 1)
                     if run[k:k + w] in self.numbers and run[k:k + w] != run]
        return hits

    def in_content(self, data: bytes, header_end: int | None = None) -> list[tuple[str, int]]:
        low = data.lower()
        hits = self._numbers_in(low)
        if self._long:
            hits += [(m.group(0), m.start()) for m in self._long.finditer(low)]
        if self._short:
            region = low if header_end is None else low[:header_end]
            hits += [(m.group(1), m.start(1)) for m in self._short.finditer(region)]
        return [(self.source[v], pos) for v, pos in self._not_excused(low, hits)]

    def find_leaks(self, name: str, data: bytes) -> list[Leak]:
        """Every identifying value in an output's content or name (see :func:`find_leaks`)."""
        return find_leaks(name, data, self)

    def in_name(self, name: str) -> list[str]:
        low = name.lower().encode("utf-8", "replace")
        # file names are short: a value anywhere in one is a leak, word or not (our own words
        # excused, kept values not: no output is named after a serial)
        hits = self._numbers_in(low)
        if self._any_word:
            hits += [(m.group(1), m.start(1)) for m in self._any_word.finditer(low)]
        if self._long:
            hits += [(m.group(0), m.start()) for m in self._long.finditer(low)]
        own = masked_spans(low)
        hits = [v for v, pos in hits if not excused(self.source[v], pos, len(v), own, [])]
        return sorted({self.source[v] for v in hits})


def _alternation(values: list[bytes], word: bool) -> re.Pattern[bytes] | None:
    if not values:
        return None
    body = b"|".join(re.escape(v) for v in sorted(set(values), key=lambda v: (-len(v), v)))
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
        header_end = pos if pos > 0 else None
        return data + b"\n" + b"\n".join(gzip_contents(data[:header_end])), header_end
    return data, None


def gzip_contents(data: bytes) -> list[bytes]:
    """Text hidden in gzip streams inside a header (GE's protocol data block).

    Both the stream and its header: a gzip header names a file and stamps a
    time (RFC 1952), and GE puts the exam number and the scan time there.
    """
    out = []
    start = data.find(b"\x1f\x8b\x08")
    while start >= 0:
        member = data[start:]
        flags, mtime = member[3], int.from_bytes(member[4:8], "little")
        if mtime:
            out.append(datetime.fromtimestamp(mtime, timezone.utc).strftime("gzip-mtime %Y%m%d").encode())
        if flags & 0x08:  # FNAME: zero-terminated
            out.append(member[10:member.find(b"\x00", 10)])
        try:
            out.append(zlib.decompressobj(31).decompress(member))
        except zlib.error:
            out.append(b"unreadable gzip stream")
        start = data.find(b"\x1f\x8b\x08", start + 3)
    return out


class PHILeakError(CorelabError, RuntimeError):
    """An output about to leave the restricted stores still holds an identifying value."""

    code = "phi_in_output"


def find_leaks(name: str, data: bytes, matcher: Matcher) -> list[Leak]:
    """Every identifying value in an output's content or name."""
    leaks = [Leak(name, src, "file name") for src in matcher.in_name(name)]
    content, header_end = decoded(name, data)
    leaks += [Leak(name, src, f"content at byte {pos}")
              for src, pos in matcher.in_content(content, header_end)]
    return leaks


class LeakFinder(Protocol):
    """What finds a study's identifying values in an output: a Matcher, or a Fingerprint of one."""

    def find_leaks(self, name: str, data: bytes) -> list[Leak]: ...


def check_no_phi(label: str, payload: object, finders: Iterable[LeakFinder]) -> None:
    """Refuse to write rows or events that hold an identifying value of any of ``finders``."""
    data = json.dumps(payload, default=str, sort_keys=True).encode()
    leaks = [leak for finder in finders for leak in finder.find_leaks(label, data)]
    if leaks:
        raise PHILeakError(f"{label}: refusing to write: " + "; ".join(sorted({leak.source for leak in leaks})))
