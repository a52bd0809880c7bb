"""The DICOM receiver: a Storage SCP that puts every instance in the inbox the moment it arrives.

A site's PACS or scanner sends a study with C-STORE (pynetdicom's Storage SCP, every storage SOP
class pynetdicom knows, every transfer syntax pydicom can read; C-ECHO answers too). What happens:

1. **Association.** Only a calling AE title that a site of the trial lists, from an address the
   site lists (when it lists any), may associate. Anything else gets an A-ASSOCIATE-RJ, rejected
   permanent, by the service user, "calling AE title not recognised" (PS3.8 9.3.4), and an audit
   event ``dicom_association_refused`` (the AE title and address, never a patient value). AE titles
   are spoofable: a real deployment runs with TLS (``ssl_context``, client certificates required),
   so only a peer holding a certificate the core lab issued can associate at all.
2. **Instance.** Each C-STORE is written, as received (file meta and the data set's bytes as
   encoded by the peer, pixel data untouched), to ``inbox/<site>/<upload>/<instance>.dcm``: on a
   local lake atomically (temporary name, fsync, rename, fsync of the folder) before the handler
   answers success; on an object store one PUT. An instance that could not be written is answered
   0xA700 (out of resources) so the sender keeps it and tries again. The names are digests, never
   UIDs: ``<upload>`` is ``scp-<StudyInstanceUID digest>-<n>``, ``<instance>`` the SOPInstanceUID's
   digest (the same instance sent twice is stored once; the same UID with other bytes is kept
   beside it, for the inventory to name as ``duplicate_uid``).
3. **Completion.** A study is complete when every association that brought instances of it is
   released (or aborted) and nothing came for ``idle_s`` seconds; then ``on_study_complete(site,
   folder)`` is called with the lake path of the upload folder (``Lake.local_folder`` makes it a
   local path for ``receive_study``). Once it returns, a marker
   ``inbox/.receiver/<site>/<upload>.json`` records the hand-off; an instance of the same study that
   arrives later starts a new upload (``-<n+1>``), as a site re-sending a series would.
4. **Restart.** Nothing acknowledged is lost: an upload folder without its marker was never handed
   over, so :meth:`DicomReceiver.start` picks it up (it completes after ``idle_s`` like any other,
   and instances of the same study still arriving join it). A callback that raises is tried again
   (``idle_s`` doubling, at most every five minutes), and on a restart. The hand-off is at least
   once: a crash between the callback and its marker repeats the callback, which the receive flow
   takes as the same upload again.

The access decision (:func:`access_decision`) and the names are pure functions; the receiver
imports no flow (the service wires the callback to ``receive_study``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from data_contracts.trial import TrialConfig
from tasks.errors import CorelabError
from tasks.intake.custody import inbox_prefix
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake

log = logging.getLogger(__name__)

#: Where the hand-off markers live: beside the sites' folders, under a name no site id can take.
RECEIVER_STATE = "inbox/.receiver"
UPLOAD_PREFIX = "scp-"
_UPLOAD = re.compile(r"^scp-([0-9a-f]{16})-([0-9]+)$")

# C-STORE statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_AUTHORIZED = 0x0124
# A-ASSOCIATE-RJ: rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized (PS3.8 9.3.4)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)

#: At most this long between two tries of a failed hand-off.
MAX_RETRY_S = 300.0


def _readable_syntaxes() -> list[str]:
    """Every transfer syntax pydicom reads and has a pixel decoder for, the native ones first.

    The data set is stored as received and its pixel data are not decoded here, so a decoder's
    plugin need not be installed (the conversion stage decodes). Left out is only what pydicom
    has no pixel decoder for at all (video, audio, JPIP references): nothing an MR study holds,
    and a sender offered no such syntax converts to one we take.
    """
    out = []
    for uid in AllTransferSyntaxes:
        try:
            get_decoder(uid)
        except NotImplementedError:
            continue
        out.append(str(uid))
    return [u for u in out if u in NATIVE_SYNTAXES] + [u for u in out if u not in NATIVE_SYNTAXES]


#: Implicit and Explicit VR Little Endian, Deflated Explicit VR Little Endian, Explicit VR Big Endian.
NATIVE_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"]
TRANSFER_SYNTAXES: list[str] = _readable_syntaxes()
STORAGE_SOP_CLASSES: list[str] = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


class ReceiverError(CorelabError):
    """The receiver cannot start as configured (address in use, TLS without client certificates)."""

    code = "receiver_failed"


# -- pure helpers ------------------------------------------------------------

@dataclass(frozen=True)
class AccessDecision:
    """Whether a calling AE title from an address may associate, and as which site.

    ``site`` is the site id when accepted, else None and ``reason`` says why (no patient value).
    """

    site: str | None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.site is not None


def _address_in(address: str, networks: Iterable[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


def access_decision(trial: TrialConfig, calling_ae: str, address: str) -> AccessDecision:
    """The site a calling AE title from ``address`` belongs to, or why it may not associate.

    The site is the one whose ``ae_titles`` hold the calling AE title (spaces around it do not
    count, case does: DICOM AE titles are case-sensitive) and whose ``addresses``, when it lists
    any, hold the source address (an IP or a CIDR network). An AE title that two sites list and
    the address cannot tell apart is refused, never guessed.
    """
    ae = (calling_ae or "").strip()
    listed = [s for s in trial.sites if ae and ae in [a.strip() for a in s.ae_titles]]
    if not listed:
        return AccessDecision(None, f"calling AE title {ae!r} is not listed for any site")
    allowed = [s for s in listed if not s.addresses or _address_in(address, s.addresses)]
    if not allowed:
        return AccessDecision(None, f"calling AE title {ae!r} is listed for site "
                                    f"{', '.join(s.id for s in listed)} but not from address {address}")
    if len(allowed) > 1:
        return AccessDecision(None, f"calling AE title {ae!r} from {address} is listed for more than one "
                                    f"site ({', '.join(s.id for s in allowed)})")
    return AccessDecision(allowed[0].id)


def digest(uid: str) -> str:
    """A short digest standing for a UID in a lake name (a UID may identify a patient's study)."""
    return hashlib.sha256(uid.strip().encode("ascii", "replace")).hexdigest()[:16]


def upload_name(study_digest: str, n: int) -> str:
    """The upload folder of the ``n``-th delivery of one study to the receiver."""
    return f"{UPLOAD_PREFIX}{study_digest}-{n}"


def parse_upload_name(name: str) -> tuple[str, int] | None:
    """``(study digest, n)`` of a receiver's upload folder name, None for any other name."""
    m = _UPLOAD.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def instance_name(sop_instance_uid: str) -> str:
    return f"{digest(sop_instance_uid)}.dcm"


def handed_marker(site: str, upload: str) -> str:
    """The lake path recording that an upload folder was handed to the callback."""
    return f"{RECEIVER_STATE}/{site}/{upload}.json"


def retry_delay(idle_s: float, attempts: int) -> float:
    """Seconds before the next try of a hand-off that failed ``attempts`` times."""
    return min(max(idle_s, 1.0) * 2 ** attempts, MAX_RETRY_S)


# -- the receiver ------------------------------------------------------------

@dataclass(eq=False)
class _Upload:
    """One study's upload folder while it fills, and until it is handed over."""

    site: str
    study: str                      # digest of the StudyInstanceUID
    n: int
    last: float                     # monotonic time of the last instance or release
    assocs: set[Association] = field(default_factory=set)   # open associations that brought instances
    writing: int = 0                # C-STOREs being written now
    attempts: int = 0               # failed hand-offs
    retry_at: float = 0.0

    @property
    def name(self) -> str:
        return upload_name(self.study, self.n)

    @property
    def folder(self) -> str:
        return inbox_prefix(self.site, self.name)


StudyCallback = Callable[[str, str], Any]


class DicomReceiver:
    """A Storage SCP writing into the lake's inbox, handing each complete study to a callback.

    Parameters
    ----------
    trial
        The trial: its sites' ``ae_titles`` and ``addresses`` decide who may associate.
    lake
        Where instances go (``inbox/<site>/scp-.../``).
    ae_title
        The receiver's own AE title.
    host, port
        Address to listen on; port 0 takes a free port (see :attr:`port` once started).
    idle_s
        Seconds without an instance, after the last association that brought some is released,
        before a study is complete.
    on_study_complete
        ``callback(site, folder)`` with the lake path of the complete upload folder. Called from
        one thread at a time; it may take its time (a hand-off does not block receiving).
    ssl_context
        Server-side TLS context; it must require client certificates (``CERT_REQUIRED``).
    max_associations
        Concurrent associations accepted (pynetdicom's default is 10).
    poll_s
        How often the background thread looks for complete studies (default: ``idle_s / 4``,
        within 0.05-1 s).
    background
        False: no background thread; the caller calls :meth:`poll` (tests, an outer loop).
    """

    def __init__(self, trial: TrialConfig, lake: Lake, ae_title: str = "CORELAB", host: str = "127.0.0.1",
                 port: int = 0, idle_s: float = 2.0, on_study_complete: StudyCallback | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_associations: int = 32,
                 poll_s: float | None = None, background: bool = True) -> None:
        if ssl_context is not None and ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ReceiverError("the receiver's TLS context must require client certificates "
                                "(ssl_context.verify_mode = ssl.CERT_REQUIRED): without them an AE title "
                                "is all that identifies a site, and AE titles are spoofable")
        if idle_s < 0:
            raise ReceiverError(f"idle_s must be 0 or more seconds, not {idle_s}")
        self.trial, self.lake = trial, lake
        self.ae_title, self.host, self._want_port = ae_title, host, port
        self.idle_s = float(idle_s)
        self.on_study_complete = on_study_complete
        self.ssl_context = ssl_context
        self.max_associations = max_associations
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(0.05, self.idle_s / 4))
        self.background = background
        self._lock = threading.Lock()           # the state below
        self._handing = threading.Lock()        # one hand-off at a time
        self._open: dict[tuple[str, str], _Upload] = {}    # (site, study digest) -> upload filling now
        self._due: list[_Upload] = []           # complete, waiting for the callback (or its retry)
        self._sites: dict[Association, str] = {}
        self._durable_folders: set[str] = set()
        self._name_locks = [threading.Lock() for _ in range(64)]   # one writer per instance name
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- life cycle ------------------------------------------------------------
    @property
    def port(self) -> int:
        """The port listened on (once started)."""
        if self._server is None:
            raise ReceiverError("the receiver is not started")
        return int(self._server.server_address[1])

    def start(self) -> "DicomReceiver":
        """Pick up uploads a previous run left unhanded, then listen."""
        if not any(s.ae_titles for s in self.trial.sites):
            raise ReceiverError(f"no site of trial {self.trial.trial_id} lists an AE title (sites[].ae_titles): "
                                "the receiver would refuse every association")
        self.recover()
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        # defence in depth: pynetdicom itself refuses an AE title no site lists, should the
        # access handler below ever fail (a failing notification handler would not stop it)
        ae.require_calling_aet = sorted({a.strip() for s in self.trial.sites for a in s.ae_titles})
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, NATIVE_SYNTAXES)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        try:
            self._server = ae.start_server((self.host, self._want_port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)
        except OSError as exc:
            raise ReceiverError(f"the DICOM receiver cannot listen on {self.host}:{self._want_port}: {exc}") from exc
        self._ae = ae
        if self.background:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dicom-receiver-poll", daemon=True)
            self._thread.start()
        log.info("DICOM receiver %s listening on %s:%d%s", self.ae_title, self.host, self.port,
                 " (TLS)" if self.ssl_context else "")
        return self

    def stop(self) -> None:
        """Stop listening (open associations are aborted) and stop looking for complete studies.

        Studies not handed over yet stay in the inbox without a marker: the next start picks them up.
        """
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "DicomReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # a lake outage: the uploads stay, the next poll tries again
                log.exception("DICOM receiver: looking for complete studies failed")

    # -- restart ---------------------------------------------------------------
    def recover(self) -> list[str]:
        """Register the upload folders a previous run wrote and never handed over; returns them.

        Partial writes a crash left (temporary names, never acknowledged to the sender) are removed.
        The newest folder of a study takes further instances of it; older ones only wait for the
        callback.
        """
        found: list[_Upload] = []
        now = time.monotonic()
        for site in self.trial.sites:
            for name in self.lake.listdir(f"inbox/{site.id}"):
                parsed = parse_upload_name(name)
                if parsed is None or self.lake.exists(handed_marker(site.id, name)):
                    continue
                up = _Upload(site.id, parsed[0], parsed[1], last=now)
                self._drop_partial_writes(up.folder)
                if self.lake.find(up.folder):
                    found.append(up)
        with self._lock:
            for up in sorted(found, key=lambda u: u.n):
                older = self._open.get((up.site, up.study))
                if older is not None:  # an older delivery of the study only waits for its hand-off
                    self._due.append(older)
                self._open[(up.site, up.study)] = up
        if found:
            log.info("DICOM receiver: %d upload(s) left unhanded by an earlier run picked up", len(found))
        return [up.folder for up in found]

    def _drop_partial_writes(self, folder: str) -> None:
        if not self.lake.is_local:
            return  # an object store's PUT is whole or absent
        path = self.lake.path(folder)
        for name in os.listdir(path) if os.path.isdir(path) else []:
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(path, name))

    # -- association -----------------------------------------------------------
    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title or "")
        address = str(assoc.requestor.address)
        decision = access_decision(self.trial, calling, address)
        if decision.accepted:
            with self._lock:
                self._sites[assoc] = decision.site  # type: ignore[assignment]
            return
        log.warning("DICOM association refused: %s", decision.reason)
        assoc.acse.send_reject(*REJECT_CALLING_AE)
        try:
            append_event(self.lake, "dicom_association_refused", actor="dicom-receiver",
                         calling_ae=calling.strip(), address=address, reason=decision.reason,
                         reason_code="association_refused")
        except Exception:
            log.exception("the refused association could not be audited")
        assoc.kill()

    def _on_closed(self, event: evt.Event) -> None:
        assoc = event.assoc
        now = time.monotonic()
        with self._lock:
            self._sites.pop(assoc, None)
            for up in self._open.values():
                if assoc in up.assocs:
                    up.assocs.discard(assoc)
                    up.last = max(up.last, now)

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # -- instances -------------------------------------------------------------
    def _on_store(self, event: evt.Event) -> int:
        assoc = event.assoc
        with self._lock:
            site = self._sites.get(assoc)
        if site is None:  # the access check did not run or failed: refuse, fail closed
            return NOT_AUTHORIZED
        try:
            data = event.encoded_dataset(include_meta=True)
            sop_uid = str(event.request.AffectedSOPInstanceUID or "")
            study = digest(_study_uid(event))
            with self._lock:
                up = self._open_upload(site, study)
                up.writing += 1
                up.assocs.add(assoc)
                up.last = time.monotonic()
        except Exception:
            log.exception("DICOM receiver: a C-STORE for site %s could not be taken; answered 0xA700", site)
            return OUT_OF_RESOURCES
        try:
            self._store(up.folder, sop_uid, data)
        except Exception:
            log.exception("DICOM receiver: an instance for site %s could not be written; answered 0xA700", site)
            return OUT_OF_RESOURCES
        finally:
            with self._lock:
                up.writing -= 1
                up.last = time.monotonic()
        return SUCCESS

    def _open_upload(self, site: str, study: str) -> _Upload:
        """The upload folder instances of ``study`` go to now (caller holds the lock)."""
        up = self._open.get((site, study))
        if up is None:
            taken = [u.n for u in self._due if (u.site, u.study) == (site, study)]
            for name in self.lake.listdir(f"inbox/{site}") + [
                    n.removesuffix(".json") for n in self.lake.listdir(f"{RECEIVER_STATE}/{site}")]:
                parsed = parse_upload_name(name)
                if parsed and parsed[0] == study:
                    taken.append(parsed[1])
            up = _Upload(site, study, max(taken, default=0) + 1, last=time.monotonic())
            self._open[(site, study)] = up
        return up

    def _store(self, folder: str, sop_uid: str, data: bytes) -> str:
        """Write one instance durably; the same bytes again are not written twice."""
        rel = f"{folder}/{instance_name(sop_uid)}"
        with self._name_locks[int(digest(rel), 16) % len(self._name_locks)]:
            if self.lake.exists(rel):
                if self.lake.read_bytes(rel) == data:
                    return rel
                # the same SOPInstanceUID with other content: kept beside it (the inventory names it)
                rel = f"{folder}/{digest(sop_uid)}-{hashlib.sha256(data).hexdigest()[:12]}.dcm"
            self.lake.write_bytes(rel, data)  # local: temporary name, fsync, rename; object store: one PUT
        if self.lake.is_local:
            target_dir = posixpath.dirname(self.lake.path(rel))
            _fsync_dir(target_dir)  # the rename itself reaches the disk
            if folder not in self._durable_folders:
                _fsync_dir(posixpath.dirname(target_dir))  # and the new folder's own entry
                self._durable_folders.add(folder)
        return rel

    # -- completion ------------------------------------------------------------
    def pending(self) -> list[str]:
        """Lake paths of the upload folders not handed over yet (filling, or waiting for the callback)."""
        with self._lock:
            return sorted([u.folder for u in self._open.values()] + [u.folder for u in self._due])

    def poll(self, now: float | None = None) -> list[str]:
        """Hand every complete study to the callback; returns the folders handed over now.

        A study is complete when no association that brought instances of it is open, none is
        being written, and ``idle_s`` passed since the last. Safe to call from any thread: one
        hand-off runs at a time, and a call while another hands off returns at once.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            for key, up in list(self._open.items()):
                if not up.assocs and not up.writing and now - up.last >= self.idle_s:
                    del self._open[key]   # a later instance of the study starts a new upload
                    self._due.append(up)
        if not self._handing.acquire(blocking=False):
            return []
        try:
            with self._lock:
                ready = [u for u in self._due if u.retry_at <= now]
            return [up.folder for up in ready if self._hand_over(up)]
        finally:
            self._handing.release()

    def _hand_over(self, up: _Upload) -> bool:
        n_files = len(self.lake.find(up.folder))
        try:
            if self.on_study_complete is not None:
                self.on_study_complete(up.site, up.folder)
        except Exception as exc:
            up.attempts += 1
            up.retry_at = time.monotonic() + retry_delay(self.idle_s, up.attempts)
            log.error("DICOM receiver: the hand-off of %s failed (%s); tried again in %.0f s",
                      up.folder, type(exc).__name__, up.retry_at - time.monotonic())
            try:
                append_event(self.lake, "dicom_handoff_failed", actor="dicom-receiver", site=up.site,
                             upload=up.name, n_instances=n_files, error=type(exc).__name__,
                             reason_code=getattr(exc, "code", None), attempts=up.attempts)
            except Exception:
                log.exception("the failed hand-off could not be audited")
            return False
        self.lake.write_text(handed_marker(up.site, up.name), json.dumps({
            "site": up.site, "upload": up.name, "n_instances": n_files,
            "handed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        with self._lock:
            self._due.remove(up)
        try:
            append_event(self.lake, "dicom_study_complete", actor="dicom-receiver", site=up.site,
                         upload=up.name, n_instances=n_files)
        except Exception:
            log.exception("the hand-off of %s could not be audited", up.folder)
        return True


def _study_uid(event: evt.Event) -> str:
    """The StudyInstanceUID of a C-STORE's data set ('' when it has none: the inventory refuses it)."""
    try:
        return str(event.dataset.get("StudyInstanceUID", "") or "")
    except Exception:  # undecodable: stored all the same, the inventory names the problem
        return ""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
