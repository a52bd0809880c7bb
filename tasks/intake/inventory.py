"""Inventory of an upload: every file found, hashed, parsed, accepted or rejected.

An upload is a folder (any depth), and inside it plain DICOM files,
gzip-compressed DICOM (``*.gz``) and zip archives (each member is a file of
its own, named ``archive.zip!member``). Every file gets a sha256 of its bytes
as received. A file is rejected, with a reason that names it, when it cannot be
read (corrupt gzip or zip, truncated), is not DICOM, lacks an identifying UID,
or is inconsistent (pixel data shorter or longer than its header promises, a
SOPInstanceUID repeated with other content). Rejection never stops the rest of
the upload.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from tasks.errors import CorelabError
from tasks.intake.heap import collector_paused

REQUIRED_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID")
# Transfer syntaxes whose pixel data length follows from the header.
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
IGNORED_NAMES = {".DS_Store", "Thumbs.db"}
# The top-level values corelab reads (attribution, grouping, protocol parameters, scanner): each is
# decoded at inventory, so a value that cannot be (a DS "abc", an IS 1.5e400, an IPP with a bit
# flipped) refuses its file with a reason naming the element, instead of failing a later stage.
VALUES_READ = (
    "PatientID", "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "AcquisitionDateTime", "InstanceCreationDate", "SeriesNumber",
    "InstanceNumber", "SeriesDescription", "ProtocolName", "ImageType", "Manufacturer", "ManufacturerModelName",
    "DeviceSerialNumber", "SoftwareVersions", "MagneticFieldStrength", "EchoTime", "RepetitionTime",
    "InversionTime", "FlipAngle", "SliceThickness", "SpacingBetweenSlices", "PixelSpacing",
    "ImagePositionPatient", "ImageOrientationPatient", "MRAcquisitionType", "Rows", "Columns",
    "BitsAllocated", "SamplesPerPixel", "NumberOfFrames", "BurnedInAnnotation", "PatientIdentityRemoved",
)
_VALUES_READ_TAGS = tuple((kw, pydicom.datadict.tag_for_keyword(kw)) for kw in VALUES_READ)
#: Zip members: larger than this, or expanding more than MAX_RATIO times past 64 MiB, are refused unread.
MAX_MEMBER_BYTES = 4 << 30
MAX_RATIO = 200
MAX_ARCHIVE_BYTES = 8 << 30          # every member of one archive, expanded
MAX_GUNZIP_BYTES = 4 << 30           # one .gz file, expanded
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"   # Media Storage Directory Storage


@dataclass
class ReceivedFile:
    """One DICOM file accepted by the inventory.

    ``dataset`` is parsed once, pixels included, and later de-identified in
    place (so read everything needed from the original header before that);
    ``raw`` are the bytes as received, for quarantine.
    """

    rel: str                 # path inside the upload ('a.zip!b' for archive members)
    sha256: str
    size: int
    dataset: Dataset = field(repr=False)
    raw: bytes = field(repr=False, default=b"")

    @property
    def header(self) -> Dataset:
        return self.dataset

    @property
    def sop_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


@dataclass
class RejectedFile:
    rel: str
    sha256: str
    size: int
    reason: str              # names the file and the problem
    code: str                # short category for tables and the audit log
    raw: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class ListedFile:
    """A file a DICOMDIR in the upload lists (its index of the media), whether or not it arrived."""

    rel: str                 # path inside the upload, from the DICOMDIR's folder
    study_uid: str
    series_uid: str
    series_number: int       # as the DICOMDIR numbers it (Siemens XA numbers its records 1, 2, 3...)
    sop_uid: str


@dataclass
class Inventory:
    accepted: list[ReceivedFile]
    rejected: list[RejectedFile]
    duplicates: list[str]    # identical copies of an accepted file, skipped
    listed: list[ListedFile] = field(default_factory=list)

    def absent(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(study UID, series UID) -> (files a DICOMDIR lists that did not arrive, files it lists, the
        DICOMDIR's series number), for every series with one absent at least. A file counts as
        arrived by its path (a ``.gz`` of it too: the inventory reads those), or by its
        SOPInstanceUID (a copy may rename files)."""
        have_rel = {n.removesuffix(".gz") for n in self.names}
        have_sop = {f.sop_uid for f in self.accepted}
        out: dict[tuple[str, str], tuple[int, int, int]] = {}
        for item in self.listed:
            key = (item.study_uid, item.series_uid)
            gone, total, _ = out.get(key, (0, 0, item.series_number))
            out[key] = (gone + (item.rel not in have_rel and item.sop_uid not in have_sop), total + 1,
                        item.series_number)
        return {k: v for k, v in out.items() if v[0]}

    @property
    def n_files(self) -> int:
        return len(self.accepted) + len(self.rejected) + len(self.duplicates)

    @property
    def names(self) -> list[str]:
        return [f.rel for f in self.accepted] + [r.rel for r in self.rejected] + self.duplicates


class UploadNotFoundError(CorelabError, FileNotFoundError):
    """The upload path does not exist."""

    code = "upload_not_found"


def walk_upload(root: Path) -> Iterator[tuple[str, bytes | Exception]]:
    """Yield ``(relative name, raw bytes)`` for every file of an upload.

    Zip archives are opened and their members yielded as ``name.zip!member``;
    a zip that cannot be opened is yielded with the exception in place of bytes.
    """
    root = Path(root)
    if not root.exists():
        raise UploadNotFoundError(f"upload {root} does not exist")
    for path in upload_paths(root):
        if path.name in IGNORED_NAMES:
            continue
        rel = path.name if root.is_file() else path.relative_to(root).as_posix()
        if path != root and path.is_symlink():  # never followed: it may point anywhere on this machine
            yield rel, NotReadRefused("a symbolic link, not followed (an upload holds files, not links)")
            continue
        if not path.is_file():  # a FIFO, socket or device: reading it could block or never end
            yield rel, NotReadRefused("not a regular file (a pipe, socket or device), not read")
            continue
        raw = path.read_bytes()
        if path.suffix.lower() == ".zip":
            if zipfile.is_zipfile(io.BytesIO(raw)):
                yield from _zip_members(rel, raw)
            else:
                yield rel, zipfile.BadZipFile("not a valid zip archive")
        else:
            yield rel, raw


class NotReadRefused(Exception):
    """A symbolic link or a special file (pipe, socket, device) in an upload: refused, never read."""


def upload_paths(root: Path) -> list[Path]:
    """Every file of an upload, and every symbolic link in it (listed, not followed), sorted."""
    root = Path(root)
    if root.is_file():  # the upload named itself: a link given as the upload is followed
        return [root]
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        out += [here / d for d in dirs if (here / d).is_symlink()]
        out += [here / f for f in files]
    return sorted(out)


def _zip_members(rel: str, raw: bytes) -> Iterator[tuple[str, bytes | Exception]]:
    budget = MAX_ARCHIVE_BYTES  # all members of one archive together, as they are held in memory
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = f"{rel}!{info.filename}"
                if info.file_size > budget:
                    yield name, zipfile.BadZipFile(
                        f"the archive's members expand past {MAX_ARCHIVE_BYTES} bytes together; not read "
                        "(send it in parts)")
                    continue
                if info.file_size > MAX_MEMBER_BYTES or (
                        info.file_size > 64 << 20 and info.file_size > MAX_RATIO * max(info.compress_size, 1)):
                    yield name, zipfile.BadZipFile(
                        f"member expands to {info.file_size} bytes from {info.compress_size} (a zip bomb?); not read")
                    continue
                try:
                    with zf.open(info) as member:
                        data = member.read(info.file_size + 1)
                    if len(data) > info.file_size:
                        raise zipfile.BadZipFile("member longer than its header says; not read")
                    budget -= len(data)
                    yield name, data
                except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError,
                        ValueError, OSError) as exc:  # RuntimeError: encrypted; NotImplementedError: method
                    yield name, exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        yield rel, exc


def _decompress(rel: str, raw: bytes) -> bytes:
    if rel.lower().endswith(".gz") or raw[:2] == b"\x1f\x8b":
        try:
            return _gunzip(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InventoryError("corrupt_gzip", f"corrupt gzip ({exc})") from exc
    return raw


def _gunzip(raw: bytes) -> bytes:
    """gzip.decompress, bounded: a gzip bomb stops at MAX_GUNZIP_BYTES (every member of the stream)."""
    out, rest = [], raw
    while rest:
        room = MAX_GUNZIP_BYTES - sum(map(len, out))
        if room <= 0:  # (a max_length of 0 would mean no limit)
            raise InventoryError("corrupt_gzip", f"gzip expands past {MAX_GUNZIP_BYTES} bytes; not read")
        d = zlib.decompressobj(wbits=47)   # a gzip (or zlib) header
        out.append(d.decompress(rest, room))
        if d.unconsumed_tail:
            raise InventoryError("corrupt_gzip", f"gzip expands past {MAX_GUNZIP_BYTES} bytes; not read")
        if not d.eof:
            raise EOFError("compressed data ended before the end-of-stream marker")
        rest = d.unused_data.lstrip(b"\x00")   # gzip allows zero padding after a member
    return b"".join(out)


class InventoryError(CorelabError, ValueError):
    """Why one file cannot be accepted (``code`` says which rule it broke)."""

    def __init__(self, code: str, message: str):
        super().__init__(message, code)


class DicomDirFound(InventoryError):
    """The file is a DICOMDIR: the media's index, not an image; ``listed`` is what it lists."""

    def __init__(self, listed: list[ListedFile]):
        super().__init__("dicomdir", f"a DICOMDIR (the index of the media, {len(listed)} files listed), not an "
                                     "image: kept apart; the files it lists are checked against those received")
        self.listed = listed


def parse_dicom(data: bytes) -> Dataset:
    """Parse a whole DICOM file and check it is complete and consistent."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise InventoryError("not_dicom", "not a DICOM file (no DICM prefix and no readable data set)") from exc
    except RecursionError as exc:
        raise InventoryError("unreadable", "unreadable DICOM: sequences nested too deep to read") from exc
    except Exception as exc:  # pydicom on damaged bytes: any error is this file's, named
        raise InventoryError("unreadable", f"unreadable DICOM ({type(exc).__name__}: {_short(exc)}); "
                             "truncated or damaged?") from exc
    if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "") == DICOMDIR_CLASS:
        raise DicomDirFound(dicomdir_listing(ds))
    _decode_all(ds)
    for kw in REQUIRED_UIDS:
        if not str(ds.get(kw, "") or "").strip():
            tag = pydicom.datadict.tag_for_keyword(kw)
            raise InventoryError("missing_uid", f"missing required {kw} ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    _check_values(ds)
    _check_pixel_size(ds)
    return ds


def dicomdir_listing(ds: Dataset) -> list[ListedFile]:
    """The image files a DICOMDIR lists, with their study and series (PS3.3 F.5: records follow
    their parents, so a walk in order knows each file's study and series)."""
    study, series_uid, series, out = "", "", 0, []
    try:
        for rec in ds.get("DirectoryRecordSequence") or []:
            kind = str(rec.get("DirectoryRecordType", "")).strip().upper()
            if kind == "STUDY":
                study = str(rec.get("StudyInstanceUID", "") or "")
            elif kind == "SERIES":
                series_uid, series = str(rec.get("SeriesInstanceUID", "") or ""), _int(rec.get("SeriesNumber"))
            elif "ReferencedFileID" in rec:
                parts = rec.ReferencedFileID
                parts = [str(parts)] if isinstance(parts, str) else [str(p) for p in parts]
                out.append(ListedFile("/".join(parts), study, series_uid, series,
                                      str(rec.get("ReferencedSOPInstanceUIDInFile", "") or "")))
    except Exception as exc:  # a damaged index is this file's, named
        raise InventoryError("unreadable", f"DICOMDIR records cannot be read ({type(exc).__name__}: "
                                           f"{_short(exc)})") from exc
    return out


def _decode_all(ds: Dataset) -> None:
    """Decode every public element and every sequence, items included, so that a damaged one is
    refused here.

    pydicom decodes values (and reads sequence items) on first access; an element damaged past
    its tag would otherwise raise later, in the de-identification walk, out of the whole study's
    receive (found by the class-15 corpus at scale 11: "No tag to read at file position 3A8").
    """
    try:
        _decode(ds)
    except RecursionError as exc:
        raise InventoryError("unreadable", "unreadable DICOM: sequences nested too deep to read") from exc
    except Exception as exc:  # any error decoding an element is this file's, named
        raise InventoryError("unreadable", f"unreadable DICOM: an element cannot be decoded "
                             f"({type(exc).__name__}: {_short(exc)}); damaged?") from exc


def _decode(ds: Dataset) -> None:
    # Private values are left raw: de-identification removes them without reading them, and a
    # GE slice holds about a thousand (decoding them too made intake of the 150-file GE series
    # 3.3 -> 5.2 s; public elements and every sequence: 3.2 -> 3.6 s).
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if tag.is_private and raw.VR != "SQ":
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _decode(item)


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:160]


def _check_values(ds: Dataset) -> None:
    """Decode every value of :data:`VALUES_READ`; a number must be finite."""
    for kw, tag in _VALUES_READ_TAGS:
        if tag not in ds:
            continue
        try:
            elem = ds[tag]
            value = elem.value
            if elem.VR in ("DS", "IS", "US", "UL", "SS", "SL", "FD", "FL") and value not in (None, ""):
                for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]):
                    if not math.isfinite(float(v)):
                        raise ValueError(f"{v!r} is not a finite number")
        except Exception as exc:  # a bad value is this file's, named with its element
            where = f"{kw} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
            raise InventoryError("bad_value", f"{where} holds a value that cannot be read "
                                 f"({type(exc).__name__}: {_short(exc)})") from exc

def _check_pixel_size(ds: Dataset) -> None:
    if "PixelData" not in ds:
        # A non-image object (a structured report, the scanner's protocol report, a presentation
        # state, raw data) has none by design: it is kept apart. An image without pixels is a
        # truncated file (it parses up to the cut).
        sop_class = pydicom.uid.UID(str(ds.get("SOPClassUID", "") or ""))
        if sop_class.is_valid and sop_class.name != str(sop_class) and "Image" not in sop_class.name:
            raise InventoryError("not_an_image", f"a {sop_class.name} object, not an image: kept apart, "
                                                 "not converted")
        if sop_class.is_valid and sop_class.name == str(sop_class):   # a vendor's own class (Philips' 1.3.46...)
            raise InventoryError("not_an_image", f"an object of the private SOP class {sop_class} without pixel "
                                                 "data: kept apart, not converted")
        raise InventoryError("no_pixel_data", "no pixel data (truncated, or not an image object)")
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    if ts not in UNCOMPRESSED:
        return  # encapsulated: lengths are per fragment, the decoder checks them
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InventoryError("incomplete_header", f"image header incomplete ({exc})") from exc
    expected = rows * cols * frames * spp * bits // 8
    actual = len(ds.PixelData)
    # Odd lengths are padded to even (PS3.5 7.1.1).
    if actual not in (expected, expected + 1):
        raise InventoryError(
            "pixel_size", f"pixel data is {actual} bytes but the header promises {expected} "
            f"({rows}x{cols}x{frames} frames, {bits}-bit, {spp} sample(s))")


def inventory_upload(root: Path, keep_data: bool = True) -> Inventory:
    """Hash, parse and check every file of an upload.

    Parameters
    ----------
    root
        The upload folder (or one file).
    keep_data
        Keep each accepted file's pixels and raw bytes for de-identification
        and quarantine, so the upload is read and parsed only once; False
        keeps headers only (protocol inference).
    """
    with collector_paused():
        return _inventory(root, keep_data)


def _inventory(root: Path, keep_data: bool) -> Inventory:
    accepted: list[ReceivedFile] = []
    rejected: list[RejectedFile] = []
    duplicates: list[str] = []
    listed: list[ListedFile] = []
    seen: dict[str, ReceivedFile] = {}
    for rel, raw in walk_upload(root):
        if isinstance(raw, NotReadRefused):
            rejected.append(RejectedFile(rel, "", 0, f"{rel}: {raw}", "symlink"))
            continue
        if isinstance(raw, Exception):
            rejected.append(RejectedFile(rel, "", 0, f"{rel}: unreadable archive member ({type(raw).__name__}: "
                                                     f"{_short(raw)})", "bad_archive"))
            continue
        digest = hashlib.sha256(raw).hexdigest()
        try:
            data = _decompress(rel, raw)
            ds = parse_dicom(data)
        except DicomDirFound as exc:
            base = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
            listed += [ListedFile(base + f.rel, f.study_uid, f.series_uid, f.series_number, f.sop_uid)
                       for f in exc.listed]
            rejected.append(RejectedFile(rel, digest, len(raw), f"{rel}: {exc}", exc.code, raw))
            continue
        except InventoryError as exc:
            rejected.append(RejectedFile(rel, digest, len(raw), f"{rel}: {exc}", exc.code, raw))
            continue
        sop = str(ds.SOPInstanceUID)
        if sop in seen:
            if seen[sop].sha256 == digest:
                duplicates.append(rel)
                continue
            rejected.append(RejectedFile(
                rel, digest, len(raw),
                f"{rel}: SOPInstanceUID repeats {seen[sop].rel} with different content",
                "duplicate_uid", raw))
            continue
        if not keep_data and "PixelData" in ds:
            del ds.PixelData
        rec = ReceivedFile(rel, digest, len(raw), ds, raw if keep_data else b"")
        seen[sop] = rec
        accepted.append(rec)
    return Inventory(accepted, rejected, duplicates, listed)


def group_series(files: list[ReceivedFile]) -> dict[tuple[str, str], list[ReceivedFile]]:
    """Files grouped by (StudyInstanceUID, SeriesInstanceUID), in acquisition order."""
    groups: dict[tuple[str, str], list[ReceivedFile]] = {}
    for f in files:
        key = (str(f.header.StudyInstanceUID), str(f.header.SeriesInstanceUID))
        groups.setdefault(key, []).append(f)
    for members in groups.values():
        members.sort(key=lambda f: (_int(f.header.get("InstanceNumber")), f.rel))
    return dict(sorted(groups.items(), key=lambda kv: (
        _int(kv[1][0].header.get("SeriesNumber")), kv[0])))


def _int(v: object) -> int:
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0


def study_key(sop_uids: list[str]) -> str:
    """The study's identity: sha256 of its sorted original SOPInstanceUIDs."""
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()


def upload_id(inv: Inventory) -> str:
    """Content-derived id of an upload, so the same upload lands in the same folder."""
    digests = sorted(f.sha256 for f in inv.accepted) + sorted(r.sha256 for r in inv.rejected)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


@task(name="inventory", cache_policy=NO_CACHE)
def inventory_task(upload: Path) -> Inventory:
    return inventory_upload(upload)
