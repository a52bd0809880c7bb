"""The DICOM receiver on real series of ../shared/data, sent by real peers over 127.0.0.1.

Peers: pynetdicom's SCU, dcmtk's ``storescu`` and ``echoscu`` (Debian package dcmtk, installed by
``make services``). Every stored instance is compared byte for byte with the file it came from
(the data set after the file meta, which the receiver writes itself).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pynetdicom
import pytest
import yaml
from pynetdicom import AE

from data_contracts.trial import TrialConfig, load_trial
from tasks.intake.receiver import (
    DicomReceiver,
    ReceiverError,
    access_decision,
    digest,
    handed_marker,
    instance_name,
    parse_upload_name,
    retry_delay,
    upload_name,
)
from tasks.lake.audit import read_events, verify_chain
from tasks.lake.storage import Lake
from tests.data import _in_ci
from tests.helpers import DEMO_TRIAL, GE_SERIES, dicom_files

SI_STUDY = ("dcm_qa_nih", "In", "20180918Si")          # site siemens-nih (SINIH): 4 series, 8 files
XA30 = ("dcm_qa_xa30", "In")                            # site siemens-xa30 (PRISMA): Enhanced MR
TS_SERIES = ("dcm_qa_ts", "In")                          # site siemens-ts (TRIOTS): 9 files, 6 syntaxes
TWELVE_BIT = ("dcm_qa_12bit", "In")                      # site siemens-12bit (TRIO12): 3 files, one SOP UID
VIDA = ("dcm_qa_agfa", "Siemens")                        # site siemens-vida (VIDA): 4 Enhanced MR files
TRIO = ("dcm_qa", "In")                                  # site siemens-trio (TRIO): 2 files
IDLE = 0.6


# -- helpers -------------------------------------------------------------------

def dataset_bytes(raw: bytes) -> bytes:
    """The data set of a DICOM file as encoded, after the preamble and the file meta group."""
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")   # (0002,0000) UL, explicit VR LE
    return raw[144 + group_length:]


def sop_uid(raw_or_path) -> str:
    src = raw_or_path if isinstance(raw_or_path, Path) else pydicom.filebase.DicomBytesIO(raw_or_path)
    return str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)


class Calls:
    """Records the receiver's callback: (site, folder, monotonic time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []
        self.changed = threading.Condition()

    def __call__(self, site: str, folder: str) -> None:
        with self.changed:
            self.calls.append((site, folder, time.monotonic()))
            self.changed.notify_all()

    def wait(self, n: int, timeout: float = 20.0) -> list[tuple[str, str, float]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.calls) >= n, timeout), self.calls
            return list(self.calls)


def send(port: int, calling: str, files: list[Path], tls: tuple | None = None, release: bool = True):
    """Send files with pynetdicom (each as stored, without decoding); returns (statuses, association)."""
    ae = AE(ae_title=calling)
    pairs = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                    for d in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)})
    for sop, ts in pairs:
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="CORELAB", tls_args=tls)
    assert assoc.is_established, f"{calling}: association not established"
    statuses = [int(assoc.send_c_store(f).Status) for f in files]
    if release:
        assoc.release()
    return statuses, assoc


def stored(lake: Lake, folder: str) -> dict[str, bytes]:
    """SOPInstanceUID -> bytes of every instance in an upload folder."""
    out: dict[str, bytes] = {}
    for rel in lake.find(folder):
        raw = lake.read_bytes(rel)
        uid = sop_uid(raw)
        assert uid not in out, f"{uid} stored twice in {folder}"
        out[uid] = raw
    return out


def assert_same_as_sources(lake: Lake, folder: str, files: list[Path]) -> None:
    got = stored(lake, folder)
    assert sorted(got) == sorted(sop_uid(f) for f in files)
    for f in files:
        raw, src = got[sop_uid(f)], f.read_bytes()
        assert dataset_bytes(raw) == dataset_bytes(src), f.name
        a, b = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw)), pydicom.dcmread(f)
        assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
        assert a.PixelData == b.PixelData


def need_dcmtk() -> None:
    if shutil.which("storescu") and shutil.which("echoscu"):
        return
    msg = "dcmtk's storescu/echoscu are not installed (make services installs them)"
    if _in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(autouse=True)
def send_files_as_stored(monkeypatch):
    """pynetdicom's SCU sends a file's data set as it is on disk, not decoded and encoded again."""
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake")).init()


@pytest.fixture
def receiver(trial, lake):
    """Starts receivers on the test's lake; every one is stopped at the end."""
    started: list[DicomReceiver] = []

    def make(**kw) -> DicomReceiver:
        rx = DicomReceiver(kw.pop("trial", trial), kw.pop("lake", lake), idle_s=kw.pop("idle_s", IDLE), **kw)
        started.append(rx.start())
        return rx

    yield make
    for rx in started:
        rx.stop()


def trial_with(tmp_path: Path, **site_changes: dict) -> TrialConfig:
    """The demo trial with some sites' fields changed, loaded through load_trial (its validation)."""
    doc = yaml.safe_load(DEMO_TRIAL.read_text())
    for site in doc["sites"]:
        site.update(site_changes.get(site["id"], {}))
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_trial(path)


# -- pure helpers ----------------------------------------------------------------

def test_access_decision_by_calling_ae_title(trial):
    assert access_decision(trial, "GENIH", "127.0.0.1").site == "ge-nih"
    assert access_decision(trial, "  PRISMA ", "10.9.8.7").site == "siemens-xa30"  # spaces do not count
    for unknown in ("EVIL", "genih", "", "GENIH2"):                              # case does
        decision = access_decision(trial, unknown, "127.0.0.1")
        assert not decision.accepted and "not listed for any site" in decision.reason


def test_access_decision_by_source_address(tmp_path):
    trial = trial_with(tmp_path, **{"ge-nih": {"addresses": ["192.0.2.0/28", "2001:db8::7"]},
                                    "siemens-nih": {"ae_titles": ["SINIH", "SHARED"], "addresses": ["192.0.2.0/24"]},
                                    "siemens-trio": {"ae_titles": ["TRIO", "SHARED"]}})
    assert trial.site("ge-nih").addresses == ["192.0.2.0/28", "2001:db8::7"]
    assert access_decision(trial, "GENIH", "192.0.2.14").site == "ge-nih"
    assert access_decision(trial, "GENIH", "::ffff:192.0.2.3").site == "ge-nih"   # IPv4 seen through IPv6
    assert access_decision(trial, "GENIH", "2001:db8::7").site == "ge-nih"
    for outside in ("192.0.2.16", "127.0.0.1", "2001:db8::8", "not-an-address"):
        decision = access_decision(trial, "GENIH", outside)
        assert not decision.accepted and "not from address" in decision.reason, outside
    # an AE title two sites list: the address decides, or it is refused, never guessed
    assert access_decision(trial, "SHARED", "198.51.100.1").site == "siemens-trio"
    ambiguous = access_decision(trial, "SHARED", "192.0.2.200")
    assert not ambiguous.accepted and "more than one site" in ambiguous.reason


def test_site_addresses_are_validated(tmp_path):
    with pytest.raises(Exception, match="'192.0.2.300' is not an IP address or a CIDR network"):
        trial_with(tmp_path, **{"ge-nih": {"addresses": ["192.0.2.300"]}})


def test_names_carry_no_uid():
    study, sop = "1.2.840.113619.2.5.1762583153.215519.978957063.78", "1.2.840.113619.2.5.1.1"
    name = upload_name(digest(study), 3)
    assert parse_upload_name(name) == (digest(study), 3)
    assert parse_upload_name("0f3c0d5e9a1b2c3d") is None and parse_upload_name("scp-xyz-1") is None
    for text in (name, instance_name(sop), handed_marker("ge-nih", name)):
        assert study not in text and sop not in text and "113619" not in text
    assert handed_marker("ge-nih", name).startswith("inbox/.receiver/ge-nih/")
    assert [retry_delay(2.0, n) for n in (1, 2, 3)] == [4.0, 8.0, 16.0] and retry_delay(2.0, 20) == 300.0


def test_tls_must_require_client_certificates(trial, lake):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)   # CERT_NONE by default
    with pytest.raises(ReceiverError, match="must require client certificates"):
        DicomReceiver(trial, lake, ssl_context=context)


# -- real peers ---------------------------------------------------------------------

def test_pynetdicom_series_stored_once_each_and_handed_after_the_idle_time(receiver, lake):
    calls = Calls()
    rx = receiver(on_study_complete=calls)
    si, xa = dicom_files(*SI_STUDY), dicom_files(*XA30)
    statuses, _ = send(rx.port, "SINIH", si)
    released_si = time.monotonic()
    assert statuses == [0] * len(si)
    statuses, _ = send(rx.port, "PRISMA", xa)
    released_xa = time.monotonic()
    assert statuses == [0] * len(xa)
    got = sorted(calls.wait(2))
    time.sleep(2 * IDLE)
    assert sorted(calls.calls) == got, "a study was handed over twice"
    assert [(s, f.rsplit("/", 1)[0]) for s, f, _ in got] == [("siemens-nih", "inbox/siemens-nih"),
                                                             ("siemens-xa30", "inbox/siemens-xa30")]
    for (site, folder, at), released in zip(got, (released_si, released_xa)):
        assert IDLE * 0.9 <= at - released < IDLE + 3.0, (site, at - released)
        marker = json.loads(lake.read_text(handed_marker(site, folder.rsplit("/", 1)[1])))
        assert marker["n_instances"] == {"siemens-nih": 8, "siemens-xa30": 1}[site]
    assert_same_as_sources(lake, got[0][1], si)   # 4 classic MR series of one study
    assert_same_as_sources(lake, got[1][1], xa)   # Enhanced MR
    assert rx.pending() == []
    done = [e["details"] for e in read_events(lake) if e["action"] == "dicom_study_complete"]
    assert sorted((d["site"], d["n_instances"]) for d in done) == [("siemens-nih", 8), ("siemens-xa30", 1)]


def test_an_open_association_holds_its_study_until_released(receiver):
    calls = Calls()
    rx = receiver(on_study_complete=calls)
    statuses, assoc = send(rx.port, "PRISMA", dicom_files(*XA30), release=False)
    assert statuses == [0]
    time.sleep(3 * IDLE)   # idle, but the association that brought the study is still open
    assert calls.calls == [] and len(rx.pending()) == 1
    assoc.release()
    released = time.monotonic()
    [(_, folder, at)] = calls.wait(1)
    assert at - released >= IDLE * 0.9
    time.sleep(0.3)   # the marker is written once the callback returned
    assert rx.pending() == []


def test_storescu_delivers_a_series_and_echoscu_is_answered(receiver, lake):
    need_dcmtk()
    calls = Calls()
    rx = receiver(on_study_complete=calls)
    echo = subprocess.run(["echoscu", "-aet", "VIDA", "-aec", "CORELAB", "127.0.0.1", str(rx.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    files = dicom_files(*VIDA)
    sent = subprocess.run(["storescu", "-aet", "VIDA", "-aec", "CORELAB", "127.0.0.1", str(rx.port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    [(site, folder, _)] = calls.wait(1)
    assert site == "siemens-vida"
    assert_same_as_sources(lake, folder, files)


def test_an_unlisted_ae_title_or_address_is_refused_at_association(receiver, lake, tmp_path):
    need_dcmtk()
    calls = Calls()
    rx = receiver(on_study_complete=calls)
    files = dicom_files(*TWELVE_BIT)
    sent = subprocess.run(["storescu", "-aet", "EVIL", "-aec", "CORELAB", "127.0.0.1", str(rx.port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)
    assert sent.returncode != 0
    assert "Rejected Permanent" in sent.stderr and "Calling AE Title Not Recognized" in sent.stderr, sent.stderr
    ae = AE(ae_title="genih")   # a listed title in the wrong case
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="CORELAB")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
    # a listed AE title from an address its site does not list
    walled = trial_with(tmp_path, **{"siemens-12bit": {"addresses": ["192.0.2.0/24"]}})
    rx2 = receiver(trial=walled, on_study_complete=calls)
    sent = subprocess.run(["storescu", "-aet", "TRIO12", "-aec", "CORELAB", "127.0.0.1", str(rx2.port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)
    assert sent.returncode != 0 and "Calling AE Title Not Recognized" in sent.stderr
    time.sleep(2 * IDLE)
    assert lake.find("inbox") == [] and calls.calls == []
    refused = [e for e in read_events(lake) if e["action"] == "dicom_association_refused"]
    assert [(e["details"]["calling_ae"], e["details"]["address"]) for e in refused] == [
        ("EVIL", "127.0.0.1"), ("genih", "127.0.0.1"), ("TRIO12", "127.0.0.1")]
    assert all(e["details"]["reason_code"] == "association_refused" for e in refused)
    assert "not from address 127.0.0.1" in refused[2]["details"]["reason"]
    assert verify_chain(lake).ok


def test_twenty_concurrent_associations(receiver, lake):
    calls = Calls()
    rx = receiver(on_study_complete=calls)
    ge, si = dicom_files(*GE_SERIES), dicom_files(*SI_STUDY)
    # 14 parts of the GE series, 4 of the Siemens study (a series each), and 2 sending GE slices again
    jobs = [("GENIH", ge[i::14]) for i in range(14)] + [("SINIH", si[i::4]) for i in range(4)]
    jobs += [("GENIH", ge[:6]), ("GENIH", ge[-6:])]
    assert len(jobs) == 20
    start = threading.Barrier(len(jobs))
    results: list[list[int]] = [[] for _ in jobs]
    released: dict[str, float] = {}
    errors: list[BaseException] = []

    def run(i: int, calling: str, files: list[Path]) -> None:
        try:
            ae = AE(ae_title=calling)
            ae.add_requested_context(str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID),
                                     ["1.2.840.10008.1.2.1"])
            assoc = ae.associate("127.0.0.1", rx.port, ae_title="CORELAB")
            assert assoc.is_established
            start.wait(timeout=60)   # all twenty associations are open at once
            results[i] = [int(assoc.send_c_store(f).Status) for f in files]
            assoc.release()
            released[calling] = max(released.get(calling, 0.0), time.monotonic())
        except BaseException as exc:  # reported below, with the thread's job
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(r == [0] * len(job[1]) for r, job in zip(results, jobs))
    got = calls.wait(2, timeout=30)
    time.sleep(2 * IDLE)
    assert len(calls.calls) == 2, calls.calls
    by_site = {site: (folder, at) for site, folder, at in got}
    assert sorted(by_site) == ["ge-nih", "siemens-nih"]
    assert by_site["ge-nih"][1] >= released["GENIH"] + IDLE * 0.9    # after the last association's release
    assert_same_as_sources(lake, by_site["ge-nih"][0], ge)             # 150 instances, each once
    assert_same_as_sources(lake, by_site["siemens-nih"][0], si)
    assert Counter(e["action"] for e in read_events(lake))["dicom_study_complete"] == 2


_CHILD = """
import sys, time
from data_contracts.trial import load_trial
from tasks.intake.receiver import DicomReceiver
from tasks.lake.storage import Lake
rx = DicomReceiver(load_trial(sys.argv[1]), Lake(sys.argv[2]), idle_s=3600).start()
print(rx.port, flush=True)
time.sleep(3600)
"""


def test_a_receiver_killed_mid_study_loses_nothing_it_acknowledged(receiver, lake, trial):
    files = dicom_files(*SI_STUDY)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(DEMO_TRIAL), lake.url],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = child.stdout.readline()
        assert line.strip().isdigit(), child.stderr.read() if child.poll() is not None else line
        statuses, assoc = send(int(line), "SINIH", files[:5], release=False)
        assert statuses == [0] * 5
        child.send_signal(signal.SIGKILL)   # between instances, the association still open
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    assoc.abort()
    [folder] = [f"inbox/siemens-nih/{n}" for n in lake.listdir("inbox/siemens-nih")]
    assert sorted(stored(lake, folder)) == sorted(sop_uid(f) for f in files[:5])   # all five acknowledged
    partial = Path(lake.path(folder)) / ".tmp-0123456789abcdef"   # a write the kill cut short
    partial.write_bytes(files[5].read_bytes()[:1000])
    assert not lake.exists(handed_marker("siemens-nih", folder.rsplit("/", 1)[1]))

    calls = Calls()
    rx = receiver(on_study_complete=calls)
    assert rx.pending() == [folder] and not partial.exists()
    statuses, _ = send(rx.port, "SINIH", files[4:])   # the rest, and one acknowledged before again
    assert statuses == [0] * 4
    [(site, handed, _)] = calls.wait(1)
    assert (site, handed) == ("siemens-nih", folder)
    assert_same_as_sources(lake, folder, files)
    # a later delivery of the same study is a new upload, handed over on its own
    send(rx.port, "SINIH", files[:1])
    [_, (_, again, _)] = calls.wait(2)
    assert again == folder[:-1] + "2" and len(lake.find(again)) == 1


def test_a_failed_hand_off_is_tried_again_and_survives_a_restart(trial, lake):
    tries: list[str] = []

    def flaky(site: str, folder: str) -> None:
        tries.append(folder)
        raise OSError("the receive flow could not start")

    rx = DicomReceiver(trial, lake, idle_s=0.1, on_study_complete=flaky, background=False).start()
    try:
        statuses, _ = send(rx.port, "TRIO12", dicom_files(*TWELVE_BIT))
        assert statuses == [0, 0, 0]
        # three files with one SOPInstanceUID and other bytes: all kept, for the inventory to name
        assert len({lake.read_bytes(p) for p in lake.find("inbox/siemens-12bit")}) == 3
        time.sleep(0.2)
        assert rx.poll() == [] and len(tries) == 1
        assert rx.poll() == [] and len(tries) == 1                   # not before its retry time
        assert rx.poll(now=time.monotonic() + 3.0) == [] and len(tries) == 2
    finally:
        rx.stop()
    failed = [e["details"] for e in read_events(lake) if e["action"] == "dicom_handoff_failed"]
    assert [(d["site"], d["error"], d["attempts"]) for d in failed] == [("siemens-12bit", "OSError", 1),
                                                                         ("siemens-12bit", "OSError", 2)]
    calls = Calls()
    again = DicomReceiver(trial, lake, idle_s=0.1, on_study_complete=calls, background=False)
    assert again.recover() == [tries[0]]
    time.sleep(0.2)
    assert again.poll() == [tries[0]] and [c[1] for c in calls.calls] == [tries[0]]
    assert again.poll(now=time.monotonic() + 10) == []


def test_compressed_transfer_syntaxes_are_stored_unchanged(receiver, lake):
    calls = Calls()
    rx = receiver(on_study_complete=calls)
    files = dicom_files(*TS_SERIES)
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90"} <= syntaxes
    statuses, _ = send(rx.port, "TRIOTS", files)   # each file in its own syntax
    assert statuses == [0] * len(files)
    [(site, folder, _)] = calls.wait(1)
    assert site == "siemens-ts"
    assert_same_as_sources(lake, folder, files)


# -- TLS ----------------------------------------------------------------------------------

def _pki(folder: Path) -> dict[str, Path]:
    """A certificate authority, a server certificate for 127.0.0.1 and a site's client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(cn, key, issuer=None, issuer_key=None, ca=False, san=None, usage=None):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key or key, hashes.SHA256())

    out = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("corelab test CA", ca_key, ca=True)
    out["ca"] = folder / "ca.pem"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san, usage in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                             ExtendedKeyUsageOID.SERVER_AUTH),
                            ("client", None, ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        c = cert(f"corelab test {who}", key, ca, ca_key, san=san, usage=usage)
        out[who] = folder / f"{who}.pem"
        out[who].write_bytes(c.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


def test_tls_with_client_certificates(receiver, lake, tmp_path):
    pytest.importorskip("cryptography")
    pki = _pki(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(str(pki["server"]))
    calls = Calls()
    rx = receiver(on_study_complete=calls, ssl_context=server)
    files = dicom_files(*TRIO)

    without_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ae = AE(ae_title="TRIO")
    ae.add_requested_context("1.2.840.10008.1.1")
    assert not ae.associate("127.0.0.1", rx.port, ae_title="CORELAB",
                            tls_args=(without_cert, "127.0.0.1")).is_established
    ae = AE(ae_title="TRIO")
    ae.add_requested_context("1.2.840.10008.1.1")
    assert not ae.associate("127.0.0.1", rx.port, ae_title="CORELAB").is_established   # plain TCP

    with_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    with_cert.load_cert_chain(str(pki["client"]))
    statuses, _ = send(rx.port, "TRIO", files, tls=(with_cert, "127.0.0.1"))
    assert statuses == [0] * len(files)
    [(site, folder, _)] = calls.wait(1)
    assert site == "siemens-trio"
    assert_same_as_sources(lake, folder, files)
    assert len(lake.find("inbox/siemens-trio")) == len(files)   # nothing from the refused attempts


def test_on_an_object_store_each_instance_is_one_put(trial):
    from tests.helpers import s3_lake

    lake, server = s3_lake("receiver")
    calls = Calls()
    rx = DicomReceiver(trial, lake, idle_s=IDLE, on_study_complete=calls).start()
    try:
        files = dicom_files(*SI_STUDY)
        statuses, _ = send(rx.port, "SINIH", files)
        assert statuses == [0] * len(files)
        [(site, folder, _)] = calls.wait(1)
        assert site == "siemens-nih" and folder.startswith("inbox/siemens-nih/scp-")
        assert_same_as_sources(lake, folder, files)
        rx.stop()
        restarted = DicomReceiver(trial, lake, idle_s=IDLE, background=False)
        assert restarted.recover() == []   # handed over: the marker is in the bucket too
    finally:
        rx.stop()
        server.stop()
