"""Orthanc, a real PACS (Debian package orthanc), sends a real study it holds to corelab's receiver.

Orthanc plays a site's PACS: the GE series of ../shared/data is uploaded to it over its REST API
(``POST /instances``), and then it is told to send the study to corelab as a DICOM modality
(``POST /modalities/corelab/store``), as a site's PACS administrator would. Orthanc's own AE title
(``DicomAet``) is the calling AE title of that association, so a PACS configured with a title no
site lists is refused.

Each test starts an Orthanc process of its own (``Orthanc <config.json>``) with its storage, index
and configuration in the test's temporary folder, its HTTP port a free one, authentication off and
remote access off (Orthanc 1.10 has no bind address: it listens on every interface and refuses any
client not on the loopback). Its DICOM server is disabled: it only sends here, and an SCU needs no
listening port. It never touches the system service the Debian package installs (ports 8042/4242,
/etc/orthanc), and is stopped at the end of the test. ``make services`` installs the package.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from tasks.intake.receiver import RECEIVER_STATE, DicomReceiver
from tasks.lake.audit import read_events, verify_chain
from tasks.lake.storage import Lake
from tests.data import _in_ci
from tests.helpers import GE_SERIES, dicom_files
from tests.intake.test_receiver import Calls, dataset_bytes, stored

IDLE = 0.6
START_TIMEOUT_S = 30.0
STORE_TIMEOUT_S = 120.0


def need_orthanc() -> str:
    """The Orthanc program (Debian puts it in /usr/sbin, which a user's PATH may lack)."""
    exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if exe:
        return exe
    msg = "Orthanc is not installed (make services installs the Debian package orthanc)"
    if _in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """An Orthanc process of the test's own, knowing corelab's receiver as the modality ``corelab``."""

    def __init__(self, exe: str, folder: Path, aet: str, corelab_port: int) -> None:
        self.exe, self.folder, self.aet, self.corelab_port = exe, folder, aet, corelab_port
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "Orthanc":
        self.folder.mkdir(parents=True)
        for attempt in range(3):   # a free port can be taken between the probe and Orthanc's bind
            port = free_port()
            name = f"corelab-test-{self.aet}-{port}"
            config = {
                "Name": name,
                "StorageDirectory": str(self.folder / "storage"),
                "IndexDirectory": str(self.folder / "index"),
                "Plugins": [],
                "HttpPort": port,
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "HttpDescribeErrors": True,
                "OrthancExplorerEnabled": False,
                "WebDavEnabled": False,
                "SaveJobs": False,
                "DicomServerEnabled": False,
                "DicomPort": free_port(),
                "DicomAet": self.aet,
                "DicomScuTimeout": 30,
                "DicomModalities": {"corelab": ["CORELAB", "127.0.0.1", self.corelab_port]},
            }
            path = self.folder / f"orthanc-{attempt}.json"
            path.write_text(json.dumps(config, indent=2))
            self.log = self.folder / f"orthanc-{attempt}.log"
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen([self.exe, str(path)], cwd=self.folder, stdout=log,
                                             stderr=subprocess.STDOUT)
            self.url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    system = self.get("/system")
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.1)
                    continue
                if (system.get("Name"), system.get("DicomAet")) != (name, self.aet):
                    break   # someone else answers on that port
                return self
            self._stop()
            if "already in use" not in self.log.read_text(errors="replace"):
                break
        pytest.fail(f"Orthanc ({self.exe}) did not start within {START_TIMEOUT_S:.0f} s; its log ends:\n"
                    + self.log.read_text(errors="replace")[-2000:])

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # -- REST ------------------------------------------------------------------
    def call(self, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json") -> tuple[int, object]:
        """(HTTP status, JSON reply) of one REST call; an HTTP error is returned, not raised."""
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=STORE_TIMEOUT_S) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as err:
            text = err.read()
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, text.decode(errors="replace")

    def get(self, path: str):
        status, reply = self.call("GET", path)
        assert status == 200, (path, status, reply)
        return reply

    def upload(self, files: list[Path]) -> str:
        """POST every file to /instances; returns the Orthanc id of the one study they make."""
        studies = set()
        for f in files:
            status, reply = self.call("POST", "/instances", f.read_bytes(), "application/dicom")
            assert status == 200 and reply["Status"] == "Success", (f.name, status, reply)
            studies.add(reply["ParentStudy"])
        assert self.get("/studies") == sorted(studies) and len(studies) == 1, studies
        return studies.pop()

    def send_to_corelab(self, study: str) -> tuple[int, object]:
        body = json.dumps({"Resources": [study], "Synchronous": True}).encode()
        return self.call("POST", "/modalities/corelab/store", body)


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake")).init()


def test_orthanc_sends_a_study_it_holds_and_each_instance_arrives_once_unchanged(trial, lake, tmp_path):
    exe = need_orthanc()
    files = dicom_files(*GE_SERIES)   # 150 slices of one GE MR750 EPI series, one study
    source = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    study_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    assert len(source) == len(files) == 150 and len(study_uid) == 1
    calls = Calls()
    with DicomReceiver(trial, lake, idle_s=IDLE, on_study_complete=calls) as rx, \
            Orthanc(exe, tmp_path / "orthanc", "GENIH", rx.port) as pacs:
        study = pacs.upload(files)
        assert pacs.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"] == study_uid.pop()
        started = time.monotonic()
        status, reply = pacs.send_to_corelab(study)
        sent = time.monotonic()
        assert status == 200, reply
        assert reply["FailedInstancesCount"] == 0 and reply["InstancesCount"] == len(files), reply
        assert (reply["LocalAet"], reply["RemoteAet"]) == ("GENIH", "CORELAB"), reply
        [(site, folder, handed)] = calls.wait(1, timeout=30)
        time.sleep(2 * IDLE)
        assert len(calls.calls) == 1, f"the study was handed over more than once: {calls.calls}"
    print(f"\nOrthanc -> corelab: {len(files)} instances in {sent - started:.1f} s, "
          f"handed over {handed - sent:.1f} s after the store call returned")
    assert site == "ge-nih" and folder.startswith("inbox/ge-nih/scp-")
    instances = [p for p in lake.find("inbox") if not p.startswith(RECEIVER_STATE + "/")]
    assert len(instances) == len(files) and all(p.startswith(folder + "/") for p in instances)
    got = stored(lake, folder)   # SOPInstanceUID -> bytes; fails on a UID stored twice
    assert sorted(got) == sorted(source)
    for uid, f in source.items():
        raw, src = got[uid], f.read_bytes()
        # Orthanc 1.10 proposes each instance's own transfer syntax first (Explicit VR Little
        # Endian here) and sends the data set as the site uploaded it: not one byte changes
        assert dataset_bytes(raw) == dataset_bytes(src), f.name
        a, b = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw)), pydicom.dcmread(f)
        assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID, f.name
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData, f.name
    events = read_events(lake)
    done = [e["details"] for e in events if e["action"] == "dicom_study_complete"]
    assert [(d["site"], d["n_instances"]) for d in done] == [("ge-nih", len(files))]
    assert not [e for e in events if e["action"] == "dicom_association_refused"]
    assert verify_chain(lake).ok


def test_a_pacs_whose_ae_title_no_site_lists_is_refused(trial, lake, tmp_path):
    exe = need_orthanc()
    files = dicom_files(*GE_SERIES)[:10]   # refused at association, whatever the study holds
    calls = Calls()
    with DicomReceiver(trial, lake, idle_s=IDLE, on_study_complete=calls) as rx, \
            Orthanc(exe, tmp_path / "orthanc", "ROGUEPACS", rx.port) as pacs:
        study = pacs.upload(files)
        status, reply = pacs.send_to_corelab(study)
        assert status != 200, reply
        assert "Association Rejected" in str(reply), reply   # Orthanc names the A-ASSOCIATE-RJ
        time.sleep(2 * IDLE)
    assert lake.find("inbox") == [] and calls.calls == []
    refused = [e["details"] for e in read_events(lake) if e["action"] == "dicom_association_refused"]
    assert [(d["calling_ae"], d["address"], d["reason_code"]) for d in refused] == [
        ("ROGUEPACS", "127.0.0.1", "association_refused")]
    assert "'ROGUEPACS' is not listed for any site" in refused[0]["reason"]
    assert verify_chain(lake).ok
