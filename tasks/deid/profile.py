"""De-identification per DICOM PS3.15 Annex E (Basic Profile plus options).

The action for each public attribute comes from Table E.1-1
(:mod:`tasks.deid._annex_e`, generated from the standard's table). Options, each
configurable in TrialConfig.deidentification:

* Retain Longitudinal Temporal Information with Modified Dates: every date
  (DA, and the date part of DT) moves back by a per-subject number of days,
  the same at every visit, so intervals between visits survive.
* Retain Patient Characteristics (age, sex, size, weight: ComBat covariates).
* Retain Device Identity (scanner serial and station: harmonization batches).
* Clean Descriptors: descriptions are kept with every identifying value cut out.
* Retain Safe Private: only the vendor private elements that conversion needs
  (:mod:`tasks.deid._safe_private`) are kept; identifying values inside them are
  overwritten in place with values of the same length, so binary headers such
  as Siemens CSA keep their offsets.

UIDs are replaced consistently across the trial (a keyed hash of the trial
and the original UID), so re-receiving a study reproduces the same bytes.
The result is not trusted here: :mod:`tasks.deid.verify` checks it
independently before anything reaches ``deid/``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import hmac
import io
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from data_contracts.trial import Deidentification, vendor_of
from tasks.deid._annex_e import ACTIONS, WILDCARDS
from tasks.deid._safe_private import SAFE_PRIVATE
from tasks.deid.walk import maybe_sequence, raw_vr, walk
from tasks.errors import CorelabError
from tasks.intake.identify import parse_date
from tasks.intake.placeholders import is_placeholder
from tasks.lake.versions import corelab_version

OPTION_COLUMNS = {
    "retain_longitudinal_modified_dates": "rtnLongModifDatesOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_device_identity": "rtnDevIdOpt",
    "clean_descriptors": "cleanDescOpt",
    "retain_safe_private": "rtnSafePrivOpt",
}
# PS3.16 CID 7050 codes for the profile and its options.
METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "retain_longitudinal_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
}
# Free text, where an identifying value can hide. Numbers (DS, IS), code strings
# (CS) and ages (AS) cannot hold a name; leaving them unconverted keeps writing fast.
TEXT_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
PROVIDER_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "PatientBirthDate",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "AccessionNumber", "StudyID", "StationName", "DeviceSerialNumber",
)
DEVICE_KEYWORDS = {"StationName", "DeviceSerialNumber"}
# What kind of device made the images and how: never cleaned (Table E.1-1 does not list them),
# because converters need them to read the data (dcm2niix unpacks a vendor's mosaic only when it
# knows the Manufacturer). When an identifying value equals one of them (InstitutionName "UIH",
# Manufacturer "UIH"), its echoes cannot be told apart from the device's name: they are kept.
DEVICE_CLASS_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "SequenceName",
                         "PulseSequenceName", "TransmitCoilName", "ReceiveCoilName")
DEVICE_CLASS_TAGS = frozenset(int(tag_for_keyword(k)) for k in DEVICE_CLASS_KEYWORDS)


class DeidError(CorelabError, ValueError):
    """A data set that cannot be de-identified safely."""

    code = "deid_failed"


@dataclass
class DeidContext:
    """Everything one subject's de-identification needs."""

    trial_id: str
    site: str
    subject: str
    session: str
    key: bytes
    options: Deidentification
    date_shift_days: int            # negative: dates move back
    replaced_uids: dict[str, str] = field(default_factory=dict)
    needles: list[str] | None = None                     # set by prepare()
    same_length: "SameLength | None" = None
    text_probe: "re.Pattern[bytes] | None" = None
    original_dates: frozenset[str] = frozenset()
    # an upload another tool de-identified before us: its record, kept before ours (PS3.15 E.1)
    upstream_methods: tuple[str, ...] = ()
    upstream_codes: tuple[tuple[str, str, str], ...] = ()

    def prepare(self, headers: list[Dataset]) -> "DeidContext":
        """Learn the study's identifying values once, from all of its headers."""
        self.upstream_methods, self.upstream_codes = upstream_record(headers)
        needles: set[str] = set()
        patient: set[str] = set()
        dates: set[str] = set()
        uids: set[str] = set()
        for h in headers:
            needles.update(identifying_values(h, self.options))
            patient.update(v.lower() for v in identifying_values(h, self.options, PATIENT_KEYWORDS))
            h_dates, h_uids = _original_dates_and_uids(h)
            dates |= h_dates
            uids |= h_uids
        self.original_dates = frozenset(dates)
        device = {str(v).strip().lower() for h in headers for k in DEVICE_CLASS_KEYWORDS
                  for v in _as_list(h.get(k)) if str(v).strip()}
        # a patient's value is cut out even where it equals a device's (patient "PHILIPS^ANNA")
        self.needles = sorted((n for n in needles if n.lower() not in device or n.lower() in patient),
                              key=lambda v: (-len(v), v))
        keep_dates = self.options.retain_longitudinal_modified_dates
        self.same_length = SameLength(
            uids={u.encode(): self._same_length_uid(u).encode() for u in uids},
            dates={d.encode(): (self.shift(d) if keep_dates else "") .encode() or b"0" * len(d)
                   for d in dates},
            text=SameLength.text_pattern([n for n in self.needles if not n.isdigit() or len(n) >= 5]))
        # free text that holds none of the values (nor a date of the study) need not even be decoded
        self.text_probe = SameLength.text_pattern(
            self.needles + sorted(dates) + sorted(_dashed(d) for d in dates))
        return self

    @functools.cached_property
    def _stamp(self) -> tuple[DataElement, ...]:
        ds = Dataset()
        ds.PatientName = self.subject
        ds.PatientID = self.subject
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [m for m in self.upstream_methods if m not in self.method_text] + self.method_text
        ours = [(METHOD_CODES[name][0], "DCM", METHOD_CODES[name][1])
                for name in ["basic"] + [n for n in OPTION_COLUMNS if getattr(self.options, n)]]
        codes = Sequence()
        seen: set[tuple[str, str]] = set()
        for value, scheme, meaning in [*self.upstream_codes, *ours]:
            if (value, scheme) in seen:
                continue
            seen.add((value, scheme))
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        if self.options.retain_longitudinal_modified_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.ClinicalTrialProtocolID = self.trial_id
        ds.ClinicalTrialSiteID = self.site
        ds.ClinicalTrialSubjectID = self.subject
        ds.ClinicalTrialTimePointID = self.session
        ds.ClinicalTrialSponsorName = self.trial_id  # Type 1 in the Clinical Trial Subject module
        ds.ClinicalTrialProtocolName = ""
        ds.ClinicalTrialSiteName = ""
        return tuple(ds)

    def stamp_elements(self) -> tuple[DataElement, ...]:
        """What every de-identified file says about itself, built once per study.

        The elements are shared by all files of the study (they are only written,
        never changed), so stamping a file costs a dictionary insert each.
        """
        if not self.session:
            raise DeidError("the session must be known before files are stamped")
        return self._stamp

    def _same_length_uid(self, uid: str) -> str:
        """A stand-in of the same length for a UID inside a binary private header."""
        new = self.new_uid(uid).replace("2.25.", "")
        return ("2.25." + new * 2)[: len(uid)] if len(uid) > 5 else "9" * len(uid)

    @property
    def method_text(self) -> list[str]:
        enabled = [name for name in OPTION_COLUMNS if getattr(self.options, name)]
        return [f"corelab {corelab_version()} PS3.15 E.1.1 Basic Profile"] + [
            METHOD_CODES[n][1] for n in enabled]

    def new_uid(self, uid: str) -> str:
        uid = str(uid).strip()
        if not uid or uid in UID_dictionary:
            return uid  # standard UIDs (SOP classes, transfer syntaxes) identify nothing
        if uid not in self.replaced_uids:
            for attempt in range(100):
                new = keyed_uid(self.key, f"{self.trial_id}|{uid}|{attempt}")
                # a new UID must not spell an original date by chance: verification would
                # (rightly) take it for a leaked date
                if not any(d in new for d in self.original_dates):
                    break
            self.replaced_uids[uid] = new
        return self.replaced_uids[uid]

    def shift(self, value: str) -> str:
        """Shift a DA (or the date part of a DT) value; '' when unparseable."""
        value = value.strip()
        if len(value) < 8:
            return ""
        try:
            d = datetime.strptime(value[:8], "%Y%m%d").date()
        except ValueError:
            return ""
        return (d + timedelta(days=self.date_shift_days)).strftime("%Y%m%d") + value[8:]


def device_label(key: bytes, serial: str | None) -> str | None:
    """A scanner's serial number as a keyed label (Annex E without Retain Device Identity).

    The same serial gives the same label across the trial, so harmonization can still tell
    scanners apart, and nobody without the trial's key can recover the serial.
    """
    if not serial:
        return serial
    return "D" + hmac.new(key, f"device|{serial}".encode(), hashlib.sha256).hexdigest()[:12]


def keyed_uid(key: bytes, text: str) -> str:
    """A 2.25 UID (PS3.5 B.2: an integer form of a 128-bit UUID) derived from a keyed hash.

    Written here because pydicom's generate_uid ignores its entropy sources
    when the prefix is None and returns a random uuid4; replacement must be
    reproducible so that receiving a study twice yields the same bytes.
    """
    digest = hmac.new(key, text.encode(), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def date_shift_days(key: bytes, trial_id: str, subject: str, max_days: int) -> int:
    """Per-subject shift, 1..max_days days back, stable for the subject's life in the trial."""
    digest = hmac.new(key, f"date-shift|{trial_id}|{subject}".encode(), hashlib.sha256).digest()
    return -(1 + int.from_bytes(digest[:8], "big") % max_days)


# -- identifying values, for cleaning --------------------------------------------------
PERSON_NAME_KEYWORDS = {"PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                        "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                        "NameOfPhysiciansReadingStudy", "RequestingPhysician"}


PATIENT_KEYWORDS = tuple(k for k in PROVIDER_KEYWORDS if k.startswith(("Patient", "OtherPatient")))


def identifying_values(ds: Dataset, options: Deidentification,
                       keywords: tuple[str, ...] = PROVIDER_KEYWORDS) -> list[str]:
    """Values to cut out of descriptors and overwrite in kept private elements.

    Whole values, plus the components of person names and the comma-separated
    parts of addresses; never single words of institution names, which would
    maim ordinary header text ("Center" in "Isocentered").
    """
    vals: set[str] = set()
    for kw in keywords:
        if kw in DEVICE_KEYWORDS and options.retain_device_identity:
            continue
        for item in _as_list(ds.get(kw)):
            text = str(item).strip()
            vals.add(text)
            if kw in PERSON_NAME_KEYWORDS:
                vals.update(re.split(r"[\^=\s]+", text))
            elif kw.endswith("Address"):
                vals.update(p.strip(" -") for p in text.split(",") if len(p.strip(" -")) >= 5)
    return sorted((v for v in vals if len(v) >= 3 and not is_placeholder(v)), key=lambda v: (-len(v), v))


def _as_list(v: object) -> list:
    """A value's items: only true multi-values are lists (a PersonName iterates over its characters)."""
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple, MultiValue)) else [v]


def upstream_record(headers: list[Dataset]) -> tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]:
    """The de-identification another tool recorded in the received headers (methods, codes).

    PS3.15 E.1: a further de-identification adds its method to those already there. Only a
    header that says PatientIdentityRemoved YES counts; code items need a value and a scheme.
    """
    for h in headers:
        if str(h.get("PatientIdentityRemoved", "")).strip().upper() != "YES":
            continue
        methods = tuple(str(m).strip() for m in _as_list(h.get("DeidentificationMethod")) if str(m).strip())
        codes = tuple((str(i.get("CodeValue", "")).strip(), str(i.get("CodingSchemeDesignator", "")).strip(),
                       str(i.get("CodeMeaning", "")).strip())
                      for i in (h.get("DeidentificationMethodCodeSequence") or [])
                      if i.get("CodeValue") and i.get("CodingSchemeDesignator"))
        return methods, codes
    return (), ()


def _original_dates_and_uids(ds: Dataset) -> tuple[set[str], set[str]]:
    """Every date (YYYYMMDD) and every non-standard UID of a data set, in one walk."""
    dates: set[str] = set()
    uids: set[str] = set()
    for elem in walk(ds, frozenset({"DA", "DT", "UI"})):
        if elem.VR == "UI":
            if isinstance(elem.value, str) and elem.value and elem.value not in UID_dictionary:
                uids.add(elem.value)
            continue
        vals = [elem.value] if isinstance(elem.value, str) else list(elem.value or [])
        dates.update(str(v)[:8] for v in vals if parse_date(v) is not None)  # not 00000000
    return dates, uids


# -- the table ---------------------------------------------------------------------------
def action_for(tag: BaseTag, options: Deidentification) -> str | None:
    """Resolved Annex E action for a public tag (None: not in the table)."""
    entry = ACTIONS.get(int(tag))
    if entry is None:
        for mask, value, wild in WILDCARDS:
            if int(tag) & mask == value:
                entry = wild
                break
    if entry is None:
        return None
    basic, opts = entry
    chosen = [opts[col] for name, col in OPTION_COLUMNS.items()
              if getattr(options, name) and col in opts]
    if "C" in chosen:
        return "C"
    if "K" in chosen:
        return "K"
    return _resolve_basic(basic)


def _resolve_basic(code: str) -> str:
    # Combined codes keep the element where an IOD may require it (PS3.15 E.1.1 notes).
    parts = code.replace("*", "").split("/")
    for preferred in ("U", "Z", "D", "X", "K", "C"):
        if preferred in parts:
            return preferred if not (preferred == "D" and "X" in parts) else "X"
    return "X"


# -- the walk ------------------------------------------------------------------------------
def _scrub_text(text: str, needles: list[str]) -> str:
    for n in needles:
        text = re.sub(re.escape(n), "", text, flags=re.IGNORECASE)
    return re.sub(r"\s{2,}", " ", text).strip()


def _shift_dates_in_text(text: str, ctx: DeidContext) -> str:
    """The study's dates in a descriptor, shifted like the date elements (a PACS writes
    "20200630 Weekly QC" into StudyDescription); as YYYYMMDD and YYYY-MM-DD."""
    for d in ctx.original_dates:
        if d not in text and _dashed(d) not in text:
            continue
        new = ctx.shift(d) if ctx.options.retain_longitudinal_modified_dates else ""
        text = re.sub(rf"(?<!\d){d}(?!\d)", new, text)
        text = re.sub(rf"(?<!\d){_dashed(d)}(?!\d)", _dashed(new) if new else "", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def _dashed(yyyymmdd: str) -> str:
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:8]}"


UID_TOKEN = re.compile(rb"[0-9]+(?:\.[0-9]+)+")
DIGIT_RUN = re.compile(rb"[0-9]{8,}")


@dataclass(frozen=True)
class SameLength:
    """Overwrites identifying values inside binary private headers, keeping every length.

    UIDs are found as dotted-number tokens and looked up (thousands of UIDs in
    one study make a search per UID too slow); dates are found inside digit
    runs, which is where they hide in vendor UIDs; the few text values are
    searched directly.
    """

    uids: dict[bytes, bytes]
    dates: dict[bytes, bytes]
    text: re.Pattern[bytes] | None    # every text value in one pattern (see text_pattern)

    @staticmethod
    def text_pattern(values: list[str]) -> re.Pattern[bytes] | None:
        """One pattern for every value, matched against the lower-cased bytes (see ``find_text``).

        Short values and numbers match only as whole words or numbers: "27018"
        inside a longer number is another number, and "Test" inside "Latest" is
        not a name; overwriting them would only maim the header. Each
        alternative starts with its literal (the boundary check follows as a
        look-behind) and the pattern is case-sensitive on lowered input: a
        leading look-behind or IGNORECASE stops the regex engine from skipping
        ahead by first character, which made this pass ten times slower on
        GE's protocol text.
        """
        parts = []
        for value in sorted(values, key=lambda v: (-len(v), v)):
            v = re.escape(value.encode("latin-1", "replace").lower())
            if value.isdigit():
                parts.append(v + rb"(?<![0-9]" + v + rb")(?![0-9])")
            elif len(value) < 5:
                parts.append(v + rb"(?<![a-z0-9]" + v + rb")(?![a-z0-9])")
            else:
                parts.append(v)
        return re.compile(b"|".join(parts)) if parts else None

    @staticmethod
    def find_text(pattern: re.Pattern[bytes] | None, value: bytes) -> list[tuple[int, int]]:
        """Spans of ``value`` where a ``text_pattern`` value occurs, in any letter case."""
        # bytes.lower() changes ASCII letters only, so spans in the lowered copy are spans in value
        return [] if pattern is None else [m.span() for m in pattern.finditer(value.lower())]

    def __call__(self, value: bytes) -> bytes:
        if self.uids:
            value = UID_TOKEN.sub(lambda m: self.uids.get(m.group(0), m.group(0)), value)
        if self.dates:
            value = DIGIT_RUN.sub(self._dates_in_run, value)
        spans = self.find_text(self.text, value)
        if spans:
            out = bytearray(value)
            for a, b in spans:
                out[a:b] = b"X" * (b - a)
            value = bytes(out)
        return value

    def _dates_in_run(self, m: re.Match[bytes]) -> bytes:
        run = m.group(0)
        for old, new in self.dates.items():
            run = run.replace(old, new)
        return run


def _apply(ds: Dataset, elem: DataElement, action: str, ctx: DeidContext, needles: list[str]) -> None:
    tag, vr = elem.tag, elem.VR
    if action == "X":
        del ds[tag]
    elif action == "Z":
        elem.value = Sequence() if vr == "SQ" else None
    elif action == "U" or vr == "UI":
        _replace_uids(elem, ctx)
    elif vr in ("DA", "DT"):
        if action == "K" and not ctx.options.retain_longitudinal_modified_dates:
            return
        _shift_element(elem, ctx)
    elif vr == "TM" or action == "K":
        return
    elif action == "D":
        elem.value = ctx.subject if vr == "PN" else "REMOVED"
    elif action == "C" and vr in TEXT_VRS and isinstance(elem.value, str):
        elem.value = _shift_dates_in_text(_scrub_text(elem.value, needles), ctx)


def _replace_uids(elem: DataElement, ctx: DeidContext) -> None:
    if elem.value is None or elem.value == "":
        return
    if isinstance(elem.value, str):
        elem.value = ctx.new_uid(elem.value)
    else:
        elem.value = [ctx.new_uid(v) for v in elem.value]


def _shift_element(elem: DataElement, ctx: DeidContext) -> None:
    if not elem.value:
        return
    if isinstance(elem.value, str):
        elem.value = ctx.shift(elem.value) or None
    else:
        elem.value = [ctx.shift(str(v)) for v in elem.value]


def _walk(ds: Dataset, ctx: DeidContext, safe: frozenset[tuple[str, int, int]]) -> None:
    needles = ctx.needles or []
    items = list(ds.items())  # raw elements: nothing is converted unless an action needs its value
    creators = {(t.group, t.element): _creator(raw)
                for t, raw in items if t.is_private and 0x10 <= t.element <= 0xFF}
    kept_blocks: set[tuple[int, int]] = set()
    for tag, raw in items:
        if tag.is_private:
            if tag.element < 0x1000:  # private creator; decided after its block
                continue
            block = (tag.group, tag.element >> 8)
            if not ctx.options.retain_safe_private or \
                    (creators.get(block, ""), tag.group, tag.element & 0xFF) not in safe:
                del ds[tag]  # no conversion needed to drop it
                continue
            kept_blocks.add(block)
            _clean_private(ds, tag, raw, ctx, safe)
            continue
        vr = raw_vr(tag, raw)
        action = action_for(tag, ctx.options) or ("K" if int(tag) in DEVICE_CLASS_TAGS else _default_action(vr))
        if action == "X":
            del ds[tag]
            continue
        if (action == "K" or vr == "TM") and not maybe_sequence(vr, raw) and vr not in ("UI", "DA", "DT"):
            continue  # kept as is, never converted
        if action == "C" and vr in TEXT_VRS and _clean_raw(raw, ctx):
            continue  # a descriptor with no identifying value in it stays as it is
        elem = ds[tag]
        if elem.VR == "SQ" and action not in ("X", "Z"):
            for item in elem.value:
                _walk(item, ctx, safe)
            continue
        _apply(ds, elem, action, ctx, needles)
    for block in set(creators) - kept_blocks:
        del ds[Tag(*block)]


def _clean_raw(raw: object, ctx: DeidContext) -> bool:
    """True when an undecoded text value holds none of the study's identifying values."""
    value = getattr(raw, "value", None)
    if not isinstance(value, bytes):
        return False
    return not SameLength.find_text(ctx.text_probe, value)


def _creator(raw: object) -> str:
    """A private creator's name, read from the raw element without converting it."""
    value = getattr(raw, "value", b"")
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return str(value).strip()


def _default_action(vr: str) -> str:
    """For attributes Table E.1-1 does not list: names go, UIDs are replaced,
    dates shifted, text cleaned, the rest (numbers, pixels) kept."""
    if vr == "PN":
        return "Z"
    if vr in ("UI", "DA", "DT"):
        return "U" if vr == "UI" else "C"
    return "C" if vr in TEXT_VRS else "K"


def _clean_private(ds: Dataset, tag: BaseTag, raw: object, ctx: DeidContext,
                   safe: frozenset[tuple[str, int, int]]) -> None:
    """Scrub a kept private element in place, on its undecoded bytes when it has them.

    Most kept elements hold nothing to scrub; working on the raw bytes leaves
    those untouched and unconverted (decoding hundreds per file is what costs).
    """
    scrub = ctx.same_length
    vr = raw_vr(tag, raw)
    value = getattr(raw, "value", None)
    if maybe_sequence(vr, raw) or not isinstance(raw, RawDataElement) or not isinstance(value, bytes):
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _walk(item, ctx, safe)
        elif isinstance(elem.value, bytes):
            elem.value = _scrub_gzip_block(elem.value, scrub) or scrub(elem.value)
        elif isinstance(elem.value, str):
            elem.value = scrub(elem.value.encode("latin-1", "replace")).decode("latin-1")
        return
    new = _scrub_gzip_block(value, scrub) or scrub(value)
    if new != value:
        new += b"\x00" * (len(new) % 2)  # values have even length (PS3.5 7.1.1)
        ds[tag] = raw._replace(value=new, length=len(new))


def _scrub_gzip_block(value: bytes, scrub: "SameLength") -> bytes | None:
    """Clean a gzip stream inside a private element; None when there is none.

    GE keeps its protocol data block (0025,101B) as a 4-byte length and a gzip
    stream whose header carries the exam number in its file name and the scan
    time as its timestamp, and whose text repeats the series description. A
    byte search cannot see into it, so it is unpacked, cleaned and packed again
    with an empty header (no name, time 0).
    """
    # the length prefix excludes the pad byte that evens an odd value (PS3.5 7.1.1)
    prefixed = value[4:7] == b"\x1f\x8b\x08" and int.from_bytes(value[:4], "little") in (len(value) - 4,
                                                                                          len(value) - 5)
    if not (prefixed or value[:3] == b"\x1f\x8b\x08"):
        return None
    try:
        text = gzip.decompress(value[4:] if prefixed else value)
    except (OSError, EOFError, zlib.error):
        return b""  # an unreadable stream cannot be verified: drop its content
    packed = gzip.compress(scrub(text), mtime=0)
    return (len(packed).to_bytes(4, "little") + packed) if prefixed else packed


def deidentify(ds: Dataset, ctx: DeidContext) -> Dataset:
    """De-identify one data set in place and return it.

    Raises
    ------
    DeidError
        When the data set cannot be made safe (e.g. it has no SOPInstanceUID).
    """
    if "SOPInstanceUID" not in ds:
        raise DeidError("no SOPInstanceUID")
    if ctx.needles is None:
        ctx.prepare([ds])
    vendor = vendor_of(str(ds.get("Manufacturer", "")))
    safe = SAFE_PRIVATE.get(vendor, frozenset())
    _walk(ds, ctx, safe)
    _stamp(ds, ctx)
    _fix_file_meta(ds)
    return ds


def _stamp(ds: Dataset, ctx: DeidContext) -> None:
    for elem in ctx.stamp_elements():
        ds[elem.tag] = elem


def _fix_file_meta(ds: Dataset) -> None:
    old = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = old.get("TransferSyntaxUID", UID("1.2.840.10008.1.2.1"))
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"CORELAB_{corelab_version()}"[:16]
    ds.file_meta = meta


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
