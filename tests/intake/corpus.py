"""A seeded corpus of malformed uploads built from the real data (issue: every vendor's data, class 15).

Every upload mixes good files (real GE slices, as received) with bad ones made from them by one
kind of damage: truncation, bit flips in the header or the pixels, odd VRs, bad values, lengths
past the end, open sequences, deep nesting, junk and empty files, zip archives with traversal,
absolute or backslash member names, an encrypted-member flag, a zip bomb, PHI in member names,
and symlinks out of the upload. ``build_corpus`` writes them; the test sends each through intake.

Byte-level damage is done with pydicom's own writer where it can be (values, VRs, nesting) and
on the bytes where pydicom would refuse to write it (lengths, truncation, flips).
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import random
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from tests.helpers import GE_SERIES, dicom_files

GOOD_PER_UPLOAD = 3


@dataclass
class Upload:
    kind: str
    path: Path
    good: list[str] = field(default_factory=list)     # names of the good files
    bad: list[str] = field(default_factory=list)      # names of the damaged files (archive members: a.zip!m)


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


_SERIAL = itertools.count()


def _fresh(ds: Dataset) -> Dataset:
    """A copy that is a new instance (so it is not a duplicate of the good file). Its UID has a
    fixed length, so a seeded flip at a byte offset hits the same element every run (generate_uid's
    length varies with its random number: the same seed once damaged another element)."""
    ds = pydicom.dcmread(io.BytesIO(_bytes(ds)))
    ds.SOPInstanceUID = f"2.25.{next(_SERIAL):038d}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _pixel_offset(data: bytes) -> int:
    return data.rfind(b"\xe0\x7f\x10\x00")


def _truncations(ds: Dataset, rng: random.Random) -> list[bytes]:
    data = _bytes(_fresh(ds))
    end = _pixel_offset(data)
    cuts = [rng.randrange(133, end) for _ in range(6)] + [rng.randrange(end + 12, len(data)) for _ in range(4)]
    return [data[:c] for c in cuts]


def _flips(ds: Dataset, rng: random.Random, header: bool, n: int = 30) -> list[bytes]:
    out = []
    for _ in range(n):
        data = bytearray(_bytes(_fresh(ds)))
        end = _pixel_offset(bytes(data))
        lo, hi = (132, end) if header else (end + 12, len(data))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        out.append(bytes(data))
    return out


def _odd_vrs(ds: Dataset, rng: random.Random) -> list[bytes]:
    out = []
    for kw, vr in [("EchoTime", "SQ"), ("PatientName", "OB"), ("Rows", "LO"), ("SeriesNumber", "FD"),
                   ("StudyDate", "UN"), ("ImageType", "US"), ("SliceThickness", "AT"), ("PatientID", "OF")]:
        data = bytearray(_bytes(_fresh(ds)))
        tag = pydicom.datadict.tag_for_keyword(kw)
        at = data.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 132)
        if at > 0:
            data[at + 4:at + 6] = vr.encode()
            out.append(bytes(data))
    for _ in range(4):  # a VR of two random letters anywhere in the header
        data = bytearray(_bytes(_fresh(ds)))
        at = rng.randrange(140, _pixel_offset(bytes(data)) - 8)
        data[at:at + 2] = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2))
        out.append(bytes(data))
    return out


BAD_VALUES = {
    "EchoTime": "abc", "RepetitionTime": "1,5", "FlipAngle": "NaN", "SliceThickness": "-inf",
    "PixelSpacing": "x\\y", "ImageOrientationPatient": "1\\0\\0\\0\\1", "ImagePositionPatient": "",
    "StudyDate": "2020-13-45", "SeriesDate": "99999999", "AcquisitionDate": "***",
    "PatientAge": "ABCD", "PatientSex": "\x00\x01", "SeriesNumber": "one", "InstanceNumber": "1.5e400",
    "PatientWeight": "heavy", "NumberOfTemporalPositions": "-3", "MagneticFieldStrength": "3T",
}


def _with_value(data: bytes, keyword: str, value: bytes) -> bytes | None:
    """``data`` with the first element ``keyword`` (explicit VR, short length) holding ``value`` as is."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    at = data.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 132)
    if at < 0 or data[at + 4:at + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
        return None
    old_len = struct.unpack("<H", data[at + 6:at + 8])[0]
    value += b" " * (len(value) % 2)
    return data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + old_len:]


def _bad_values(ds: Dataset, rng: random.Random) -> list[bytes]:
    """Values pydicom would refuse to write, put in the bytes (the element's VR unchanged)."""
    out = []
    for kw, value in BAD_VALUES.items():
        data = _with_value(_bytes(_fresh(ds)), kw, value.encode("latin-1"))
        if data is not None:
            out.append(data)
    for kw, value in (("Rows", b"\x00\x00"), ("Rows", b"\xff\xff"), ("BitsAllocated", b"\x07\x00"),
                      ("Columns", b"\x01")):
        data = _with_value(_bytes(_fresh(ds)), kw, value)
        if data is not None:
            out.append(data)
    return out


def _lengths_past_end(ds: Dataset, rng: random.Random) -> list[bytes]:
    out = []
    for kw in ("SeriesDescription", "PatientName", "ImageType", "PixelData", "StudyInstanceUID"):
        data = bytearray(_bytes(_fresh(ds)))
        tag = pydicom.datadict.tag_for_keyword(kw)
        at = data.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 132)
        if at < 0:
            continue
        vr = bytes(data[at + 4:at + 6])
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            data[at + 8:at + 12] = struct.pack("<I", len(data) * 4)
        else:
            data[at + 6:at + 8] = struct.pack("<H", 0xFFF0)
        out.append(bytes(data))
    return out


def _open_sequence(ds: Dataset, rng: random.Random) -> list[bytes]:
    base = _bytes(_fresh(ds))
    end = _pixel_offset(base)
    # an undefined-length sequence (and an item) that is never closed, before the pixels
    seq = struct.pack("<HH", 0x0009, 0x0010) + b"LO" + struct.pack("<H", 4) + b"JUNK"
    seq += struct.pack("<HH", 0x0009, 0x1001) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    seq += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + struct.pack("<HH", 0x0010, 0x0010) + b"PN\x04\x00ABCD"
    return [base[:end] + seq, base + seq]


def _deep(ds: Dataset, depth: int) -> bytes:
    """A ContentSequence nested ``depth`` deep (undefined lengths, every level closed), before the pixels."""
    base = _bytes(_fresh(ds))
    end = _pixel_offset(base)
    open_ = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    open_ += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    leaf = struct.pack("<HH", 0x0008, 0x0100) + b"SH\x02\x00X "
    return base[:end] + open_ * depth + leaf + close * depth + base[end:]


def _nesting(ds: Dataset, rng: random.Random) -> list[bytes]:
    return [_deep(ds, 60), _deep(ds, 3000)]


def _junk(ds: Dataset, rng: random.Random) -> list[bytes]:
    return [b"", b"\x00" * 132, b"\x00" * 128 + b"DICM", b"\x00" * 128 + b"DICM" + rng.randbytes(4000),
            rng.randbytes(10_000), b"%PDF-1.4 not an image", "Smith^John 1970-01-01 MRN 12345".encode()]


GENERATORS = {
    "truncated": _truncations,
    "header_flips": lambda ds, rng: _flips(ds, rng, header=True),
    "pixel_flips": lambda ds, rng: _flips(ds, rng, header=False, n=6),
    "odd_vrs": _odd_vrs,
    "bad_values": _bad_values,
    "past_end": _lengths_past_end,
    "open_sequence": _open_sequence,
    "deep_nesting": _nesting,
    "junk_and_empty": _junk,
}


def _zip(members: list[tuple[str, bytes]], encrypted: set[str] = frozenset()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    raw = bytearray(buf.getvalue())
    for name in encrypted:  # set the "encrypted" general-purpose bit in both headers
        for sig in (b"PK\x03\x04", b"PK\x01\x02"):
            at = raw.find(sig)
            while at >= 0:
                flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
                name_len = struct.unpack("<H", raw[at + (26 if sig == b"PK\x03\x04" else 28):][:2])[0]
                start = at + (30 if sig == b"PK\x03\x04" else 46)
                if raw[start:start + name_len] == name.encode():
                    raw[flag_at] |= 0x01
                at = raw.find(sig, at + 4)
    return bytes(raw)


def _zip_bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("bomb.dcm", "w", force_zip64=True) as f:
            chunk = b"\x00" * (1 << 20)
            for _ in range(2048):          # 2 GiB of zeros, about 2 MB compressed
                f.write(chunk)
    return buf.getvalue()


GZIP_BOMB_BYTES = 96 << 20


def _gzip_zeros(n: int) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as f:
        chunk = b"\x00" * (1 << 20)
        for _ in range(n >> 20):
            f.write(chunk)
    return buf.getvalue()


def build_corpus(root: Path, seed: int = 0, scale: int = 1) -> list[Upload]:
    """Write the corpus under ``root``: one folder per upload; returns what each holds.

    ``scale`` runs each damage generator that many times: 95 damaged files a pass plus 15 in the
    archives and links, so 110 at 1 and 1,060 at 11 (the issue's corpus had 990). The random
    damage (truncations, bit flips, random VRs) goes on with the seeded generator and hits other
    bytes each pass; the fixed damage (bad values, lengths, sequences, nesting, most junk) repeats
    with a new UID.
    """
    global _SERIAL
    _SERIAL = itertools.count(seed * 10**9)
    rng = random.Random(seed)
    files = dicom_files(*GE_SERIES)
    base = pydicom.dcmread(files[0])
    uploads = []

    def upload(kind: str) -> Upload:
        u = Upload(kind, root / kind)
        u.path.mkdir(parents=True)
        for p in files[:GOOD_PER_UPLOAD]:
            (u.path / p.name).write_bytes(p.read_bytes())
            u.good.append(p.name)
        uploads.append(u)
        return u

    for kind, make in GENERATORS.items():
        u = upload(kind)
        for rep in range(scale):
            for i, data in enumerate(make(base, rng)):
                name = f"bad_{i:03d}.dcm" if rep == 0 else f"bad_{rep:02d}_{i:03d}.dcm"
                (u.path / name).write_bytes(data)
                u.bad.append(name)
    good_member = files[GOOD_PER_UPLOAD].read_bytes()
    zips = {
        "zip_traversal": [("../../escape.dcm", _bytes(_fresh(base))), ("a/../../../etc/escape2.dcm", b"junk")],
        "zip_absolute": [("/tmp/absolute.dcm", _bytes(_fresh(base))), ("C:/Windows/x.dcm", b"junk")],
        "zip_backslash": [("dir\\sub\\back.dcm", _bytes(_fresh(base))), ("..\\..\\escape.dcm", b"junk")],
        "zip_phi_names": [("Smith^John_19700101_MRN12345.dcm", _bytes(_fresh(base))),
                          ("Doe^Jane/19800707.dcm", b"junk")],
    }
    for kind, members in zips.items():
        u = upload(kind)
        (u.path / "upload.zip").write_bytes(_zip([("good.dcm", good_member), *members]))
        u.good.append("upload.zip!good.dcm")
        u.bad += [f"upload.zip!{n}" for n, d in members if d == b"junk"]
    u = upload("zip_encrypted")
    (u.path / "upload.zip").write_bytes(_zip([("good.dcm", good_member), ("locked.dcm", _bytes(_fresh(base)))],
                                             encrypted={"locked.dcm"}))
    u.good.append("upload.zip!good.dcm")
    u.bad.append("upload.zip!locked.dcm")
    u = upload("zip_bomb")
    (u.path / "bomb.zip").write_bytes(_zip_bomb())
    u.bad.append("bomb.zip!bomb.dcm")
    u = upload("zip_odd_names")           # a member beside a folder of its name, a very long name
    (u.path / "upload.zip").write_bytes(_zip([("good.dcm", good_member), ("a", b"junk"), ("a/b", b"junk"),
                                              ("n" * 300 + ".dcm", b"junk")]))
    u.good.append("upload.zip!good.dcm")
    u.bad += ["upload.zip!a", "upload.zip!a/b", "upload.zip!" + "n" * 300 + ".dcm"]
    u = upload("gzip_bomb")               # expands past inventory.MAX_GUNZIP_BYTES (the test lowers it)
    (u.path / "bomb.dcm.gz").write_bytes(_gzip_zeros(GZIP_BOMB_BYTES))
    u.bad.append("bomb.dcm.gz")
    u = upload("special_files")
    os.mkfifo(u.path / "pipe.dcm")
    u.bad.append("pipe.dcm")
    u = upload("zip_corrupt")
    (u.path / "cut.zip").write_bytes(_zip([("x.dcm", good_member)])[:-40])
    u.bad.append("cut.zip")
    u = upload("symlinks")
    outside = root / "outside-secret.dcm"
    outside.write_bytes(_bytes(_fresh(base)))
    (u.path / "link_out.dcm").symlink_to(outside)
    (u.path / "link_etc").symlink_to("/etc/hostname")
    (u.path / "link_dir").symlink_to(root / "truncated", target_is_directory=True)
    u.bad += ["link_out.dcm", "link_etc", "link_dir"]
    return uploads
