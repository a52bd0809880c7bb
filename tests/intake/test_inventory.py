"""Inventory of uploads: every bad file is rejected with a reason naming it; the rest goes on."""

from __future__ import annotations

import hashlib
import os
import zipfile

import pydicom
import pytest

from tasks.intake.inventory import (
    InventoryError,
    UploadNotFoundError,
    group_series,
    inventory_upload,
    parse_dicom,
    study_key,
)
from tests.helpers import GE_SERIES, copy_upload, dicom_files, gz, rewrite


@pytest.fixture
def ge_upload(tmp_path):
    return copy_upload(tmp_path / "upload", *GE_SERIES, limit=12)


def _reasons(inv):
    return {r.rel: (r.code, r.reason) for r in inv.rejected}


def test_clean_series_is_all_accepted_and_hashed(ge_upload):
    inv = inventory_upload(ge_upload)
    assert len(inv.accepted) == 12 and not inv.rejected
    f = inv.accepted[0]
    assert f.sha256 == hashlib.sha256((ge_upload / f.rel).read_bytes()).hexdigest()
    assert len(group_series(inv.accepted)) == 1


def test_each_bad_file_is_rejected_with_its_name_and_the_rest_accepted(ge_upload):
    files = sorted(ge_upload.iterdir())
    # truncated DICOM: half of a real file
    trunc = files[0]
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    # random bytes named .dcm
    (ge_upload / "random.dcm").write_bytes(os.urandom(4096))
    # a real file without SOPInstanceUID
    rewrite(files[1], SOPInstanceUID=None)
    # a corrupt .gz: a real file, gzipped, then cut
    bad_gz = gz(files[2])
    bad_gz.write_bytes(bad_gz.read_bytes()[:500])
    # a header that lies about the image size
    rewrite(files[3], Rows=128)
    # a good gzipped file and a zip of two good files are fine
    gz(files[4])
    with zipfile.ZipFile(ge_upload / "two.zip", "w") as zf:
        for p in files[5:7]:
            zf.write(p, arcname=f"inner/{p.name}")
            p.unlink()
    (ge_upload / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")

    inv = inventory_upload(ge_upload)
    reasons = _reasons(inv)
    assert reasons[trunc.name][0] in ("unreadable", "pixel_size", "no_pixel_data")
    assert reasons["random.dcm"][0] == "not_dicom"
    assert reasons[files[1].name][0] == "missing_uid" and "SOPInstanceUID (0008,0018)" in reasons[files[1].name][1]
    assert reasons[bad_gz.name][0] == "corrupt_gzip"
    assert reasons[files[3].name][0] == "pixel_size"
    assert "header promises 16384 (128x64" in reasons[files[3].name][1]
    assert reasons["broken.zip"][0] == "bad_archive"
    for rel, (_, reason) in reasons.items():
        assert reason.startswith(rel + ":"), reason  # every reason names its file
    accepted = {f.rel for f in inv.accepted}
    assert f"{files[4].name}.gz" in accepted
    assert {f"two.zip!inner/{p.name}" for p in files[5:7]} <= accepted
    assert len(inv.accepted) == 12 - 4  # four spoiled; the gzipped and zipped ones count


def test_duplicate_uid_with_other_content_is_rejected(ge_upload):
    files = sorted(ge_upload.iterdir())
    twin = ge_upload / "twin.dcm"
    twin.write_bytes(files[0].read_bytes())          # identical copy: skipped, not an error
    other = ge_upload / "other.dcm"
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = pydicom.dcmread(files[0]).SOPInstanceUID
    ds.save_as(other, enforce_file_format=True)       # same UID, other pixels: rejected
    inv = inventory_upload(ge_upload)
    assert inv.duplicates == ["twin.dcm"] or inv.duplicates == [files[0].name]
    assert _reasons(inv)["other.dcm"][0] == "duplicate_uid"


def test_parse_reads_the_enhanced_file():
    f = dicom_files("dcm_qa_xa30", "In")[0]
    ds = parse_dicom(f.read_bytes())
    assert ds.NumberOfFrames == 96


def test_parse_refuses_text():
    with pytest.raises(InventoryError) as exc:
        parse_dicom(b"hello world\n" * 20)
    assert exc.value.code == "not_dicom"


def test_missing_upload_is_named(tmp_path):
    with pytest.raises(UploadNotFoundError, match="nope"):
        inventory_upload(tmp_path / "nope")


def test_study_key_ignores_order():
    assert study_key(["1.2", "1.3"]) == study_key(["1.3", "1.2"]) != study_key(["1.2"])


@pytest.mark.parametrize("vr", [b"\x55\xc9", b"U\x80"])
def test_a_required_uid_with_a_damaged_vr_is_refused_naming_its_tag(vr):
    """Found by the class-15 corpus at scale 11: a bit flip in SOPClassUID's VR made pydicom raise
    NotImplementedError on first access to the value, a traceback out of the inventory."""
    data = bytearray(dicom_files(*GE_SERIES)[0].read_bytes())
    at = data.index(b"\x08\x00\x16\x00UI")             # (0008,0016) SOPClassUID, explicit VR
    data[at + 4:at + 6] = vr
    with pytest.raises(InventoryError, match=r"cannot be decoded .*Unknown Value .* \(0008,0016\)") as exc:
        parse_dicom(bytes(data))
    assert exc.value.code == "unreadable"


def test_an_element_damaged_past_its_tag_is_refused_at_inventory(tmp_path):
    """Found by the class-15 corpus at scale 11: a header flip that dcmread parses, but whose
    sequence item cannot be read when a later stage touches it ("No tag to read at file position
    3A8"), raised out of the de-identification walk and failed the whole study's receive. Every
    element is decoded at inventory now, so the file is refused there, named."""
    from tests.intake.corpus import build_corpus

    (flips,) = [u for u in build_corpus(tmp_path, seed=0, scale=11) if u.kind == "header_flips"]
    undecodable = []
    for name in flips.bad:
        try:
            parse_dicom((flips.path / name).read_bytes())
        except InventoryError as exc:       # anything else would fail the test here
            if "an element cannot be decoded" in str(exc):
                assert exc.code == "unreadable"
                undecodable.append(str(exc))
    assert undecodable      # damaged values refused here, named, none raised out of a later stage
