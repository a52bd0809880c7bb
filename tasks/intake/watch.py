"""The upload drop watcher: sites drop uploads in a folder or an S3 prefix, each is handed over once.

A site drops an upload (a folder of DICOM files, a zip, ``.dcm.gz`` files, any depth) as
``uploads/<site>/<upload>/`` under a drop root: a local folder or an fsspec URL
(``s3://bucket/prefix``). What happens:

1. **Listing.** Every ``interval_s`` the watcher lists ``uploads/`` (one walk of a local folder,
   links listed and never followed; one paginated listing of an object store) and takes a
   snapshot of each upload: every file's size and version (its mtime in ns on disk, its ETag on
   an object store). Names starting with ``.`` (a transfer in progress: rsync's ``.name.XXXXXX``,
   an sftp client's temporary file; our own state) count as change but are never handed over; a
   site folder or upload folder starting with ``.`` is not looked at. A file directly under
   ``uploads/`` or ``uploads/<site>/`` is in no upload folder: logged once, never handed over.
2. **Ready.** An upload is ready when a file ``READY`` is at its top (the site says it is done:
   handed over at once), or when its snapshot did not change for ``quiet_s`` seconds
   (:func:`readiness`). A ``READY`` marker alone, or dot-files alone, is nothing to hand over.
3. **Site.** The site folder must be a site of the trial (``trial.site(id)``). An upload under
   any other folder is never handed over; it is logged and audited once (``upload_refused``,
   reason ``upload_site_unknown``, the folder and upload names only, never a file's content or
   name), and a refusal marker keeps a restart from auditing it again. Once the trial lists the
   site, the upload is handed over like any other.
4. **Staging.** The callback always gets a local folder holding exactly the upload's files, the
   ``READY`` marker and dot-files left out: ``<work_dir>/<site>/<upload>@<generation>-<random>``. From a
   local root the files are hard links (no copy on the same file system; a copy across file
   systems, a link re-created as a link for the inventory to refuse); from an object store
   they are downloaded (s3fs, concurrently) and checked for size. Both are staged under a
   temporary name and renamed into place, so a staged folder is never partial. The upload is
   listed again after staging: if anything changed meanwhile, the copy is dropped and the upload
   waits for its quiet period again, so what is handed over is what was judged ready. (Handing
   a local root's own folder would put the ``READY`` marker into the inventory, which refuses
   it as ``not_dicom`` and would send the site a query about it; and the copy is a snapshot that
   a late file cannot half-join.)
5. **Hand-over.** ``on_upload_ready(site, local_path)`` is called, one upload at a time. Once it
   returns, a marker records the files handed over (see *Markers*) and an audit event
   ``upload_ready`` is appended. A callback that raises is tried again after a back-off
   (doubling from ``interval_s``, at most every five minutes; :func:`retry_delay`), audited
   ``upload_handoff_failed`` each time, and again after a restart (no marker was written). The
   hand-over is at least once: a crash between the callback and its marker repeats the callback,
   which the receive flow takes as the same upload again (upload ids are content digests).
   With ``keep_staged`` (default) a handed copy stays for whoever reads it later (an
   event-triggered ``receive`` run on a worker; :func:`ready_event` builds the
   ``corelab.upload.ready`` event the deployment expects) and is then the caller's to remove;
   ``keep_staged=False`` removes it as soon as the callback returns (a callback that receives in
   the same process). A copy whose hand-over failed is always removed.
6. **Changes after a hand-over.** The rule: a new or changed file (not a dot-file) in a handed
   upload starts a new hand-over of the whole upload as it is then (generation 2, 3...), once it
   is ready again. The ``READY`` marker handed with the first generation does not make the next
   one ready (the site may still be adding files): the quiet period does, or a ``READY`` marker
   written again (a new mtime or ETag). Files only removed start nothing. The watcher never
   deletes or changes anything in the drop root (it may be the site's, and read-only to us).

Markers
    ``inbox/.watcher/<root id>/handed/<site>/<upload>.json`` in the **lake**, not in the drop
    root: the drop root is the sites' side (often writable by them, possibly read-only to the
    core lab), so a marker there could be deleted or forged by a site, or not be writable at all;
    the lake is the core lab's own restricted store, where the receiver keeps its hand-off
    markers too (``inbox/.receiver/``), and the inbox is where the raw file names a marker lists
    belong. ``<root id>`` is a digest of the drop root's URL, so two drop roots feeding one lake
    keep apart (and a drop root that moves is watched as a new one: its uploads are handed over
    again, which the receive flow takes as uploads it already has). Upload names that are not
    plain (``[A-Za-z0-9][A-Za-z0-9._+-]*``) are stored under a digest, with the name inside.
    Refusals: ``inbox/.watcher/<root id>/refused/<digest>.json``. Run one watcher per drop root.

The drop root is opened as a :class:`~tasks.lake.storage.Lake` (``Lake(url, storage_options)``,
the same fsspec/s3fs construction and options as the lake, paths relative and kept inside the
root), not with ``open_lake``: that one falls back to ``$CORELAB_LAKE`` when the URL is empty
(the watcher would watch the lake) and creates the lake's stores, which do not belong in a drop
root. Listings with sizes and versions go to the filesystem directly (the Lake lists names only).

The readiness decision and the names are pure functions; the watcher imports no flow (the
service wires the callback to ``receive_study`` or to an event).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from data_contracts.trial import TrialConfig, UnknownSiteError
from tasks.errors import CorelabError
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake

log = logging.getLogger(__name__)

#: The file a site puts at the top of an upload to say it is complete.
READY = "READY"
#: Where sites drop uploads, below the drop root.
UPLOADS = "uploads"
#: Where the watcher's markers live in the lake (beside the receiver's ``inbox/.receiver``).
WATCHER_STATE = "inbox/.watcher"
#: The event the ``receive`` deployment waits for (deployments/prefect.yaml).
READY_EVENT = "corelab.upload.ready"
#: At most this long between two tries of a failed hand-over.
MAX_RETRY_S = 300.0

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,100}")

#: One upload's files: path inside the upload -> (size, version: mtime in ns or ETag).
Snapshot = Mapping[str, tuple[int, str]]
UploadCallback = Callable[[str, str], Any]


class WatcherError(CorelabError):
    """The watcher cannot run as configured (bad settings, a drop root it cannot list), or stage an upload."""

    code = "watcher_failed"


# -- pure helpers ------------------------------------------------------------

def split_upload_path(rel: str) -> tuple[str, str, str] | None:
    """``(site folder, upload, path inside the upload)`` of a path relative to the drop root.

    None for anything that is not a file inside an upload folder (a file directly under
    ``uploads/`` or ``uploads/<site>/``) and for hidden site or upload folders (``.``-names).
    """
    parts = rel.split("/")
    if len(parts) < 4 or parts[0] != UPLOADS or not all(parts[1:3]):
        return None
    if parts[1].startswith(".") or parts[2].startswith("."):
        return None
    return parts[1], parts[2], "/".join(parts[3:])


def is_hidden(inner: str) -> bool:
    """Whether a path inside an upload has a ``.``-name: a transfer in progress, never handed over."""
    return any(p.startswith(".") for p in inner.split("/"))


def payload(snapshot: Snapshot) -> dict[str, tuple[int, str]]:
    """The files of an upload that are handed over: all but the ``READY`` marker and dot-files."""
    return {p: sig for p, sig in snapshot.items() if p != READY and not is_hidden(p)}


def new_files(handed: Snapshot | None, current: Snapshot) -> list[str]:
    """Files of ``current`` to hand over that ``handed`` did not hold as they are now (sorted)."""
    before = handed or {}
    return sorted(p for p, sig in payload(current).items() if before.get(p) != sig)


def readiness(previous: Snapshot | None, current: Snapshot, quiet_for: float, quiet_s: float,
              handed: Snapshot | None = None) -> str | None:
    """Why an upload is ready to hand over now (``"marker"`` or ``"quiet"``), or None.

    Parameters
    ----------
    previous
        The upload's snapshot at the previous look (None: first seen now).
    current
        Its snapshot now.
    quiet_for
        Seconds since the snapshot last changed (since first seen, if it never did).
    quiet_s
        The quiet period that makes an upload without a ``READY`` marker ready.
    handed
        The files handed over last time (None: never handed over). Only a new or changed file
        starts a new hand-over, and the ``READY`` marker then counts only if it was written again.
    """
    if not new_files(handed, current):
        return None
    marker = current.get(READY)
    if marker is not None and (handed is None or handed.get(READY) != marker):
        return "marker"
    if previous is not None and dict(previous) == dict(current) and quiet_for >= quiet_s:
        return "quiet"
    return None


def retry_delay(base_s: float, attempts: int) -> float:
    """Seconds before the next try of a hand-over that failed ``attempts`` times."""
    return min(max(base_s, 1.0) * 2 ** attempts, MAX_RETRY_S)


def _digest(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:n]


def safe_name(name: str) -> str:
    """A name for a marker or a staged folder: the name itself when plain, else ``~<digest>``."""
    return name if _PLAIN.fullmatch(name) else f"~{_digest(name)}"


def root_id(url: str) -> str:
    """A short digest naming a drop root in the lake's watcher state."""
    return _digest(url, 12)


def handed_marker(root: str, site: str, upload: str) -> str:
    """The lake path recording what of an upload was handed over (``root`` is :func:`root_id`)."""
    return f"{WATCHER_STATE}/{root}/handed/{site}/{safe_name(upload)}.json"


def refused_marker(root: str, site_folder: str, upload: str) -> str:
    """The lake path recording that an upload under an unknown site folder was reported."""
    return f"{WATCHER_STATE}/{root}/refused/{_digest(site_folder + '/' + upload)}.json"


def local_rel(inner: str) -> str:
    """Where a file of an upload goes in its staged folder: its own path, unless that could leave it.

    An object store's key may hold empty segments or backslashes (a Windows client's path); such a
    file is staged under one flat name ending with a digest of the key, never outside the staged
    folder. (A ``..`` segment is a dot-name, never handed over; it is guarded against here all the same.)
    """
    parts = inner.split("/")
    if all(p not in ("", ".", "..") and "\\" not in p and "\0" not in p for p in parts):
        return inner
    flat = re.sub(r"[^A-Za-z0-9._-]+", "_", inner).strip("._") or "file"
    return f"{flat[:120]}-{_digest(inner, 10)}"


@dataclass(frozen=True)
class Handed:
    """One hand-over: the site, the upload's name in the drop root, the local folder handed over."""

    site: str
    upload: str
    path: str
    generation: int
    ready_by: str          # "marker" or "quiet"
    n_files: int


def ready_event(handed: Handed) -> dict[str, Any]:
    """Arguments of ``prefect.events.emit_event`` for the ``receive`` deployment's trigger.

    Its payload carries ``upload`` (the local folder) and ``site``, as deployments/prefect.yaml
    reads them; the resource id names the upload by a digest, not by the site's name for it.
    """
    upload = _digest(f"{handed.site}/{handed.upload}/{handed.generation}")
    return {"event": READY_EVENT,
            "resource": {"prefect.resource.id": f"corelab.upload.{handed.site}.{upload}"},
            "payload": {"upload": handed.path, "site": handed.site, "generation": handed.generation}}


# -- the watcher ---------------------------------------------------------------

@dataclass(eq=False)
class _Upload:
    """What the watcher knows of one upload folder between two looks."""

    folder: str                     # the site folder's name (a site id once checked)
    name: str
    snapshot: dict[str, tuple[int, str]]
    changed_at: float               # when the snapshot last changed (first seen)
    attempts: int = 0               # failed hand-overs in a row
    retry_at: float = 0.0


class DropWatcher:
    """Watches ``uploads/<site>/`` of a drop root and hands each ready upload to a callback once.

    Parameters
    ----------
    trial
        The trial: its site ids are the site folders taken.
    lake
        Where the watcher's markers and audit events go.
    root_url
        The drop root: a local folder or an fsspec URL (``s3://bucket/prefix``).
    storage_options
        fsspec options of the drop root (for S3: key, secret, client_kwargs.endpoint_url...).
    quiet_s
        Seconds an upload without a ``READY`` marker must stay unchanged before it is ready.
    interval_s
        Seconds between two looks of the background thread (also the retry back-off's base).
    on_upload_ready
        ``callback(site, local_path)`` with a local folder holding the upload's files. Called
        from one thread at a time.
    work_dir
        Local folder for staged copies (default: ``corelab-drop-<root id>`` in the temporary
        folder). Put it on the drop root's file system to stage a local root by hard links.
    keep_staged
        Keep a handed copy for a later reader (default); False removes it once the callback returns.
    """

    def __init__(self, trial: TrialConfig, lake: Lake, root_url: str, storage_options: dict[str, Any] | None = None,
                 quiet_s: float = 30.0, interval_s: float = 2.0, on_upload_ready: UploadCallback | None = None,
                 work_dir: str | os.PathLike[str] | None = None, keep_staged: bool = True) -> None:
        if not root_url:
            raise WatcherError("the drop root's URL is empty: name a folder or an s3:// prefix")
        if quiet_s < 0:
            raise WatcherError(f"quiet_s must be 0 or more seconds, not {quiet_s}")
        if interval_s <= 0:
            raise WatcherError(f"interval_s must be more than 0 seconds, not {interval_s}")
        self.trial, self.lake = trial, lake
        self.root = Lake(root_url, dict(storage_options or {}))
        self.root_id = root_id(self.root.uri())
        self.quiet_s, self.interval_s = float(quiet_s), float(interval_s)
        self.on_upload_ready = on_upload_ready
        self.work_dir = os.fspath(work_dir) if work_dir is not None else os.path.join(
            tempfile.gettempdir(), f"corelab-drop-{self.root_id}")
        self.keep_staged = keep_staged
        self._uploads: dict[tuple[str, str], _Upload] = {}
        self._handed: dict[tuple[str, str], dict[str, Any] | None] = {}   # marker content, None: never handed
        self._unwritten: dict[str, dict[str, Any]] = {}                  # markers the lake did not take yet
        self._refused: set[tuple[str, str]] = set()
        self._loose: set[str] = set()
        self._busy = threading.Lock()           # one look (and hand-over) at a time
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- life cycle ------------------------------------------------------------
    def start(self) -> "DropWatcher":
        """Check that the drop root can be listed, clear partial staged copies, then watch in a thread."""
        if self.root.is_local and not os.path.isdir(self.root.root):
            raise WatcherError(f"the drop root {self.root.root} is not a folder (sites drop uploads in "
                               f"{self.root.root}/{UPLOADS}/<site>/<upload>/)")
        try:
            self._list(UPLOADS)
        except Exception as exc:
            raise WatcherError(f"the drop root {self.root.uri()} cannot be listed: "
                               f"{type(exc).__name__}: {exc}") from exc
        self._clear_partial_staging()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="drop-watcher", daemon=True)
        self._thread.start()
        log.info("drop watcher on %s/%s: quiet period %.0f s, a look every %.1f s, staging in %s",
                 self.root.uri(), UPLOADS, self.quiet_s, self.interval_s, self.work_dir)
        return self

    def stop(self) -> None:
        """Stop watching (a hand-over under way finishes first). Nothing handed over is lost."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "DropWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # an outage of the drop root or the lake: the next look tries again
                log.warning("drop watcher: looking at %s failed (%s: %s); trying again in %.1f s",
                            self.root.uri(), type(exc).__name__, exc, self.interval_s)

    def _clear_partial_staging(self) -> None:
        if not os.path.isdir(self.work_dir):
            return
        for site in os.listdir(self.work_dir):
            folder = os.path.join(self.work_dir, site)
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)

    # -- looking ---------------------------------------------------------------
    def poll(self, now: float | None = None) -> list[Handed]:
        """Look at the drop root once and hand every ready upload over; returns the hand-overs made.

        ``now`` is a monotonic time in seconds (default :func:`time.monotonic`); tests pass their
        own. A call while another look runs returns ``[]`` at once.
        """
        now = time.monotonic() if now is None else now
        if not self._busy.acquire(blocking=False):
            return []
        try:
            self._flush_markers()
            uploads = self._snapshots()
            for key in list(self._uploads):
                if key not in uploads:   # removed from the drop root
                    del self._uploads[key]
            done: list[Handed] = []
            for (folder, name), snap in sorted(uploads.items()):
                try:
                    self.trial.site(folder)
                except UnknownSiteError:
                    self._refuse(folder, name)
                    continue
                try:
                    handed = self._hand_if_ready(folder, name, snap, now)
                except Exception as exc:   # the lake did not answer about this one: the next look tries again
                    log.warning("drop watcher: upload %r of site %s not looked at (%s: %s)", name, folder,
                                type(exc).__name__, exc)
                    continue
                if handed is not None:
                    done.append(handed)
            return done
        finally:
            self._busy.release()

    def _hand_if_ready(self, site: str, name: str, snap: dict[str, tuple[int, str]], now: float) -> Handed | None:
        up = self._uploads.get((site, name))
        if up is None:
            up = self._uploads[(site, name)] = _Upload(site, name, snap, changed_at=now)
            previous = None
        else:
            previous = up.snapshot
            if snap != previous:
                up.snapshot, up.changed_at = snap, now
        if now < up.retry_at:
            return None
        record = self._record(site, name)
        why = readiness(previous, snap, now - up.changed_at, self.quiet_s,
                        record["files"] if record is not None else None)
        if why is None:
            return None
        generation = (record["generation"] if record is not None else 0) + 1
        return self._hand_over(up, why, generation, now)

    def _snapshots(self) -> dict[tuple[str, str], dict[str, tuple[int, str]]]:
        """Every upload folder under ``uploads/<site>/`` with its snapshot."""
        out: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}
        for rel, sig in self._list(UPLOADS).items():
            where = split_upload_path(rel)
            if where is None:
                self._loose_file(rel)
                continue
            out.setdefault(where[:2], {})[where[2]] = sig
        return out

    def _list(self, rel: str) -> dict[str, tuple[int, str]]:
        """Every file below ``rel`` of the drop root (relative to it) with its (size, version)."""
        base = self._abs(rel)
        out: dict[str, tuple[int, str]] = {}
        if self.root.is_local:
            if not os.path.isdir(base):
                return out
            def unreadable(exc: OSError) -> None:
                log.warning("drop watcher: %s cannot be listed (%s); its files are not seen", exc.filename,
                            exc.strerror)

            for folder, dirs, files in os.walk(base, onerror=unreadable, followlinks=False):
                names = files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]
                for n in names:
                    path = os.path.join(folder, n)
                    try:
                        st = os.lstat(path)
                    except FileNotFoundError:   # gone between the walk and the look
                        continue
                    out[self.root.rel(path)] = (st.st_size, str(st.st_mtime_ns))
            return out
        self.root.fs.invalidate_cache(base)   # what other machines wrote since the last look
        for path, info in self.root.fs.find(base, detail=True).items():
            if info.get("type") == "directory" or path.endswith("/"):
                continue
            version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
            out[self.root.rel(path)] = (int(info.get("size") or 0), str(version))
        return out

    def _abs(self, rel: str) -> str:
        """The filesystem path of ``rel`` as named, not normalised: an object key may hold ``..``."""
        return f"{self.root.root.rstrip('/')}/{rel}"

    def _loose_file(self, rel: str) -> None:
        """A file that is in no upload folder: logged once (its name only), never handed over."""
        parts = rel.split("/")
        if rel in self._loose or any(p.startswith(".") for p in parts[1:3]):
            return
        self._loose.add(rel)
        log.warning("drop watcher: %s is not inside an upload folder (uploads/<site>/<upload>/...); "
                    "not handed over", rel)

    # -- unknown sites -----------------------------------------------------------
    def _refuse(self, folder: str, name: str) -> None:
        """Report an upload under a folder that is no site of the trial, once (also across restarts)."""
        if (folder, name) in self._refused:
            return
        marker = refused_marker(self.root_id, folder, name)
        if self.lake.exists(marker):
            self._refused.add((folder, name))
            return
        reason = f"uploads/{folder}/ is not a site of trial {self.trial.trial_id}"
        log.warning("drop watcher: upload %r refused: %s", name, reason)
        try:
            append_event(self.lake, "upload_refused", actor="drop-watcher", site_folder=folder, upload=name,
                         reason=reason, reason_code="upload_site_unknown")
            self.lake.write_text(marker, json.dumps({
                "site_folder": folder, "upload": name, "root": self.root.uri(),
                "refused_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
        except Exception:   # reported at the next look instead
            log.exception("drop watcher: the refusal of upload %r could not be recorded", name)
            return
        self._refused.add((folder, name))

    # -- markers -----------------------------------------------------------------
    def _record(self, site: str, name: str) -> dict[str, Any] | None:
        """The marker of an upload's last hand-over (read from the lake once), or None."""
        key = (site, name)
        if key not in self._handed:
            path = handed_marker(self.root_id, site, name)
            record = None
            if self.lake.exists(path):
                try:
                    record = json.loads(self.lake.read_text(path))
                    record["files"] = {p: (int(s), str(v)) for p, (s, v) in record["files"].items()}
                    record["generation"] = int(record["generation"])
                except (ValueError, TypeError, KeyError, AttributeError):
                    # handed over again rather than never: the receive flow knows an upload it has
                    log.error("drop watcher: the hand-over marker %s cannot be read; upload %r counts as "
                              "never handed over", path, name)
                    record = None
            self._handed[key] = record
        return self._handed[key]

    def _flush_markers(self) -> None:
        for path, record in list(self._unwritten.items()):
            try:
                self.lake.write_text(path, json.dumps(record))
            except Exception as exc:
                log.warning("drop watcher: a hand-over marker still cannot be written (%s)", type(exc).__name__)
                return
            del self._unwritten[path]

    # -- handing over --------------------------------------------------------------
    def _hand_over(self, up: _Upload, why: str, generation: int, now: float) -> Handed | None:
        files = payload(up.snapshot)
        staged: str | None = None
        try:
            staged = self._stage(up, files, generation)
            prefix = f"{UPLOADS}/{up.folder}/{up.name}/"
            after = {rel[len(prefix):]: sig for rel, sig in self._list(prefix.rstrip("/")).items()}
            if after != up.snapshot:   # changed while staged: not what was judged ready
                shutil.rmtree(staged, ignore_errors=True)
                up.snapshot, up.changed_at = after, now
                log.info("drop watcher: upload %r of site %s changed while it was staged; waiting again",
                         up.name, up.folder)
                return None
            if self.on_upload_ready is not None:
                self.on_upload_ready(up.folder, staged)
        except Exception as exc:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            up.attempts += 1
            delay = retry_delay(self.interval_s, up.attempts)
            up.retry_at = now + delay
            log.error("drop watcher: the hand-over of upload %r of site %s failed (%s: %s); tried again in %.0f s",
                      up.name, up.folder, type(exc).__name__, getattr(exc, "code", ""), delay)
            try:
                append_event(self.lake, "upload_handoff_failed", actor="drop-watcher", site=up.folder,
                             upload=up.name, generation=generation, n_files=len(files), error=type(exc).__name__,
                             reason_code=getattr(exc, "code", None), attempts=up.attempts)
            except Exception:
                log.exception("drop watcher: the failed hand-over could not be audited")
            return None
        up.attempts, up.retry_at = 0, 0.0
        record = {"site": up.folder, "upload": up.name, "root": self.root.uri(), "generation": generation,
                  "ready_by": why, "files": dict(up.snapshot), "staged": staged,
                  "handed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._handed[(up.folder, up.name)] = record
        marker = handed_marker(self.root_id, up.folder, up.name)
        try:
            self.lake.write_text(marker, json.dumps(record))
        except Exception as exc:   # kept in memory and written at the next look; a crash first repeats it
            log.error("drop watcher: the hand-over marker of upload %r could not be written (%s)",
                      up.name, type(exc).__name__)
            self._unwritten[marker] = record
        if not self.keep_staged:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("drop watcher: upload %r of site %s handed over (%d files, %s, generation %d)",
                 up.name, up.folder, len(files), "READY marker" if why == "marker" else "quiet period", generation)
        try:
            append_event(self.lake, "upload_ready", actor="drop-watcher", site=up.folder, upload=up.name,
                         generation=generation, n_files=len(files), ready_by=why)
        except Exception:
            log.exception("drop watcher: the hand-over of upload %r could not be audited", up.name)
        return Handed(up.folder, up.name, staged, generation, why, len(files))

    def _stage(self, up: _Upload, files: Mapping[str, tuple[int, str]], generation: int) -> str:
        """A local folder holding exactly ``files`` of the upload, made under a temporary name."""
        site_dir = os.path.join(self.work_dir, up.folder)
        # a name of its own: a copy handed over before a crash may still be read by someone
        final = os.path.join(site_dir, f"{safe_name(up.name)}@{generation}-{uuid.uuid4().hex[:8]}")
        tmp = os.path.join(site_dir, f".tmp-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        try:
            src = self._abs(f"{UPLOADS}/{up.folder}/{up.name}")
            pairs = [(f"{src}/{inner}", os.path.join(tmp, local_rel(inner))) for inner in files]
            for _, dst in pairs:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
            if self.root.is_local:
                for src, dst in pairs:
                    _link_or_copy(src, dst)
            elif pairs:
                self.root.fs.get([s for s, _ in pairs], [d for _, d in pairs])
                for (inner, (size, _)), (_, dst) in zip(files.items(), pairs):
                    if os.path.getsize(dst) != size:
                        raise WatcherError(f"upload {up.name!r} of site {up.folder}: {inner} came down with "
                                           f"{os.path.getsize(dst)} bytes, not {size}")
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return final


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a local file into the staged folder, or copy it; a symbolic link stays a link."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:   # another file system (EXDEV), or links not allowed there
        shutil.copy2(src, dst)
