"""The upload drop watcher on real series of ../shared/data, on a local drop root and on moto's S3 server.

Times are the watcher's own clock passed to ``poll(now=...)``, so a 30 s quiet period costs no
waiting; one test runs the background thread for real. The S3 drop root is moto's real S3 API
server on 127.0.0.1 (ThreadedMotoServer), stopped at the end.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from tasks.intake.inventory import inventory_upload
from tasks.intake.watch import (
    READY,
    READY_EVENT,
    DropWatcher,
    Handed,
    WatcherError,
    handed_marker,
    local_rel,
    new_files,
    payload,
    readiness,
    ready_event,
    retry_delay,
    safe_name,
    split_upload_path,
)
from tasks.lake.audit import read_events, verify_chain
from tasks.lake.storage import Lake
from tests.helpers import dicom_files

SI_STUDY = ("dcm_qa_nih", "In", "20180918Si")    # site siemens-nih: 4 series, 8 files
XA30 = ("dcm_qa_xa30", "In")                      # site siemens-xa30: one Enhanced MR file
SITE = "siemens-nih"
QUIET = 30.0


# -- helpers -------------------------------------------------------------------

class Calls:
    """Records the callback: (site, local path, the files' bytes as the callback saw them)."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[tuple[str, str, dict[str, bytes]]] = []
        self.changed = threading.Condition()

    def __call__(self, site: str, path: str) -> None:
        assert os.path.isdir(path), path
        seen = {p.relative_to(path).as_posix(): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}
        with self.changed:
            self.calls.append((site, path, seen))
            self.changed.notify_all()
        if len(self.calls) <= self.fail:
            raise RuntimeError("the receive flow is down")


def drop(root: Path, site: str, upload: str, files: list[Path], ready: bool = False) -> Path:
    """Copy real files into ``uploads/<site>/<upload>/`` of a local drop root (series folders kept)."""
    folder = root / "uploads" / site / upload
    for f in files:
        dest = folder / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    if ready:
        (folder / READY).write_text("")
    return folder


def sources(files: list[Path]) -> dict[str, bytes]:
    return {f"{f.parent.name}/{f.name}": f.read_bytes() for f in files}


def events(lake: Lake, action: str) -> list[dict]:
    """The details of every audit event of one action, oldest first."""
    return [e["details"] for e in read_events(lake) if e["action"] == action]


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake")).init()


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "drop" / "uploads").mkdir(parents=True)
    return tmp_path / "drop"


@pytest.fixture
def watcher(trial, lake, root, tmp_path):
    def make(calls: Calls, **kw) -> DropWatcher:
        kw.setdefault("quiet_s", QUIET)
        kw.setdefault("work_dir", tmp_path / "work")
        return DropWatcher(trial, lake, str(root), on_upload_ready=calls, **kw)
    return make


# -- pure helpers ----------------------------------------------------------------

def test_readiness_from_two_snapshots():
    a = {"s1/a.dcm": (100, "1"), "s1/b.dcm": (50, "2")}
    grown = {"s1/a.dcm": (100, "1"), "s1/b.dcm": (80, "3")}
    marked = {**a, READY: (0, "9")}
    assert readiness(None, a, 0.0, QUIET) is None                 # first seen: no quiet period yet
    assert readiness(a, a, QUIET - 0.5, QUIET) is None
    assert readiness(a, a, QUIET, QUIET) == "quiet"
    assert readiness(a, grown, 100.0, QUIET) is None              # changed since the last look
    assert readiness(None, marked, 0.0, QUIET) == "marker"        # READY: at once, even on first sight
    assert readiness(None, {READY: (0, "9")}, 0.0, QUIET) is None  # nothing but the marker
    assert readiness(None, {".a.dcm.Xy12": (10, "1"), READY: (0, "9")}, 0.0, QUIET) is None
    # after a hand-over: nothing new is nothing; a new file waits for the quiet period, since the
    # old READY marker says nothing about it; a READY written again says it is complete
    assert readiness(marked, marked, 1e6, QUIET, handed=marked) is None
    more = {**marked, "s2/c.dcm": (70, "4")}
    assert readiness(more, more, 1.0, QUIET, handed=marked) is None
    assert readiness(more, more, QUIET, QUIET, handed=marked) == "quiet"
    assert readiness(None, {**more, READY: (0, "10")}, 0.0, QUIET, handed=marked) == "marker"
    assert readiness(a, {"s1/a.dcm": (100, "1")}, 1e6, QUIET, handed=a) is None   # only removed
    assert new_files(a, grown) == ["s1/b.dcm"] and new_files(None, marked) == sorted(a)
    assert payload({**a, READY: (0, "1"), "s1/.b.dcm.tmp": (3, "1")}) == a


def test_names_and_paths():
    assert split_upload_path("uploads/site-a/visit 1/s1/a.dcm") == ("site-a", "visit 1", "s1/a.dcm")
    assert split_upload_path("uploads/site-a/up.zip") is None       # a file that is in no upload folder
    assert split_upload_path("uploads/.handed/x/y") is None
    assert split_upload_path("uploads/site-a/.partial/a.dcm") is None
    assert split_upload_path("elsewhere/site-a/u/a.dcm") is None
    for key in ["../../etc/passwd", "a//b", "a\\..\\b", "./x"]:
        rel = local_rel(key)
        assert "/" not in rel and not rel.startswith(".") and rel != key
    assert local_rel("s1/a.dcm") == "s1/a.dcm"
    assert safe_name("visit1_redo") == "visit1_redo"
    assert safe_name("Doe^John 1990") != safe_name("Doe^John 1991") and safe_name("..").startswith("~")
    delays = [retry_delay(2.0, n) for n in range(1, 12)]
    assert delays[0] == 4.0 and delays == sorted(delays) and max(delays) == 300.0
    event = ready_event(Handed(SITE, "Doe^John", "/staging/x@1", 1, "marker", 3))
    assert event["event"] == READY_EVENT == "corelab.upload.ready"
    assert event["payload"] == {"upload": "/staging/x@1", "site": SITE, "generation": 1}
    assert event["resource"]["prefect.resource.id"].startswith(f"corelab.upload.{SITE}.")
    assert "Doe" not in event["resource"]["prefect.resource.id"]


def test_bad_settings_are_named(trial, lake, tmp_path):
    with pytest.raises(WatcherError, match="quiet_s"):
        DropWatcher(trial, lake, str(tmp_path), quiet_s=-1)
    with pytest.raises(WatcherError, match="empty"):
        DropWatcher(trial, lake, "")
    with pytest.raises(WatcherError, match=f"{tmp_path / 'no-such-drop'} is not a folder"):
        DropWatcher(trial, lake, str(tmp_path / "no-such-drop")).start()


# -- a local drop root ---------------------------------------------------------------

def test_ready_marker_hands_over_at_once_without_the_marker(watcher, root, lake):
    files = dicom_files(*SI_STUDY)
    folder = drop(root, SITE, "visit1", files, ready=True)
    calls = Calls()
    w = watcher(calls)
    [handed] = w.poll(now=0.0)
    assert (handed.site, handed.upload, handed.generation, handed.ready_by) == (SITE, "visit1", 1, "marker")
    [(site, path, seen)] = calls.calls
    assert site == SITE and path == handed.path and seen == sources(files)   # byte-identical, READY left out
    assert handed.n_files == len(files)
    # staged by hard links on the same file system, not copied
    for f in files:
        assert os.stat(Path(path) / f.parent.name / f.name).st_ino == os.stat(folder / f.parent.name / f.name).st_ino
    inv = inventory_upload(Path(path))   # what the receive flow reads: every file taken, nothing refused
    assert len(inv.accepted) == len(files) and inv.rejected == []
    assert w.poll(now=1.0) == [] and w.poll(now=1e6) == [] and len(calls.calls) == 1
    assert lake.exists(handed_marker(w.root_id, SITE, "visit1"))
    [event] = events(lake, "upload_ready")
    assert (event["site"], event["upload"], event["n_files"], event["ready_by"]) == (
        SITE, "visit1", len(files), "marker")
    assert verify_chain(lake).ok


def test_quiet_period_hands_over_only_after_it(watcher, root):
    files = dicom_files(*SI_STUDY)[:4]
    drop(root, SITE, "visit2", files)
    calls = Calls()
    w = watcher(calls)
    assert w.poll(now=100.0) == []
    assert w.poll(now=100.0 + QUIET - 0.1) == [] and calls.calls == []
    [handed] = w.poll(now=100.0 + QUIET)
    assert handed.ready_by == "quiet" and calls.calls[0][2] == sources(files)


def test_a_still_growing_upload_is_not_handed_over(watcher, root):
    files = dicom_files(*SI_STUDY)
    folder = drop(root, SITE, "visit3", files[:2])
    big = files[2].read_bytes()
    growing = folder / files[2].parent.name / files[2].name
    growing.parent.mkdir(parents=True, exist_ok=True)
    growing.write_bytes(big[: len(big) // 2])           # a transfer half done
    calls = Calls()
    w = watcher(calls)
    assert w.poll(now=0.0) == []
    with growing.open("ab") as fh:                       # the rest arrives at t=25
        fh.write(big[len(big) // 2:])
    assert w.poll(now=25.0) == []
    drop(root, SITE, "visit3", files[3:5])               # more files at t=50
    assert w.poll(now=50.0) == []
    assert w.poll(now=50.0 + QUIET - 1) == [] and calls.calls == []   # 79 s after the first look
    [handed] = w.poll(now=50.0 + QUIET)
    assert calls.calls[0][2] == sources(files[:5]) and handed.n_files == 5


def test_restart_does_not_repeat_and_a_new_file_starts_a_new_hand_over(watcher, root, lake):
    files = dicom_files(*SI_STUDY)
    drop(root, SITE, "visit4", files[:4], ready=True)
    first = Calls()
    assert len(watcher(first).poll(now=0.0)) == 1
    again = Calls()
    w = watcher(again)                                   # a restart: a new watcher, the same lake
    assert w.poll(now=0.0) == [] and w.poll(now=1e4) == [] and again.calls == []
    # the site adds a series to the handed upload: the READY marker of the first hand-over does
    # not make it ready, the quiet period does; the whole upload goes over as generation 2
    drop(root, SITE, "visit4", files[4:6])
    assert w.poll(now=2e4) == [] and w.poll(now=2e4 + QUIET - 1) == []
    [handed] = w.poll(now=2e4 + QUIET)
    assert (handed.generation, handed.ready_by) == (2, "quiet") and again.calls[0][2] == sources(files[:6])
    assert handed.path != first.calls[0][1]
    assert watcher(Calls()).poll(now=0.0) == []         # a second restart knows generation 2
    assert [e["generation"] for e in events(lake, "upload_ready")] == [1, 2]
    # a marker that cannot be read counts as never handed over: handed again, not lost
    lake.write_text(handed_marker(w.root_id, SITE, "visit4"), "{not json")
    late = Calls()
    [handed] = watcher(late).poll(now=0.0)
    assert handed.generation == 1 and late.calls[0][2] == sources(files[:6])


def test_a_file_arriving_while_staged_is_not_half_handed(watcher, root, monkeypatch):
    """The site writes one more file while the watcher links the others: that copy is not handed over."""
    import tasks.intake.watch as watch

    files = dicom_files(*SI_STUDY)
    folder = drop(root, SITE, "visit8", files[:3], ready=True)
    link = watch._link_or_copy

    def site_writes_meanwhile(src: str, dst: str) -> None:
        late = folder / files[3].parent.name / files[3].name
        if not late.exists():
            late.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(files[3], late)
        link(src, dst)

    monkeypatch.setattr(watch, "_link_or_copy", site_writes_meanwhile)
    calls = Calls()
    w = watcher(calls)
    assert w.poll(now=0.0) == [] and calls.calls == []
    [handed] = w.poll(now=1.0)                         # READY still says done: now with every file
    assert calls.calls[0][2] == sources(files[:4]) and handed.n_files == 4


def test_a_callback_that_raises_is_retried_with_backoff(watcher, root, lake, tmp_path):
    files = dicom_files(*SI_STUDY)[:3]
    drop(root, SITE, "visit5", files, ready=True)
    calls = Calls(fail=2)
    w = watcher(calls, interval_s=2.0)
    assert w.poll(now=0.0) == []
    assert w.poll(now=retry_delay(2.0, 1) - 0.5) == [] and len(calls.calls) == 1    # not due yet
    assert w.poll(now=retry_delay(2.0, 1)) == [] and len(calls.calls) == 2
    t = retry_delay(2.0, 1) + retry_delay(2.0, 2)
    assert w.poll(now=t - 0.5) == [] and len(calls.calls) == 2
    [handed] = w.poll(now=t)
    assert len(calls.calls) == 3 and all(seen == sources(files) for _, _, seen in calls.calls)
    failed = events(lake, "upload_handoff_failed")
    assert [e["attempts"] for e in failed] == [1, 2] and {e["error"] for e in failed} == {"RuntimeError"}
    staged = [p.name for p in (tmp_path / "work" / SITE).iterdir()]
    assert staged == [Path(handed.path).name]           # failed copies removed, no partial left


def test_a_failed_hand_over_is_tried_again_after_a_restart(watcher, root, lake):
    files = dicom_files(*SI_STUDY)[:2]
    drop(root, SITE, "visit6", files, ready=True)
    assert watcher(Calls(fail=1)).poll(now=0.0) == []
    assert not lake.exists(handed_marker(watcher(Calls()).root_id, SITE, "visit6"))
    calls = Calls()
    [handed] = watcher(calls).poll(now=0.0)
    assert handed.generation == 1 and calls.calls[0][2] == sources(files)


def test_an_unknown_site_folder_is_refused_once(watcher, root, lake, caplog):
    files = dicom_files(*SI_STUDY)[:2]
    drop(root, "no-such-site", "visit7", files, ready=True)
    drop(root, SITE, "visit7", files, ready=True)
    calls = Calls()
    w = watcher(calls)
    with caplog.at_level(logging.WARNING, logger="tasks.intake.watch"):
        assert [h.site for h in w.poll(now=0.0)] == [SITE]
        assert w.poll(now=1e4) == []
        assert watcher(Calls()).poll(now=0.0) == []     # a restart does not report it again
    assert [c[0] for c in calls.calls] == [SITE]
    [event] = events(lake, "upload_refused")
    assert (event["site_folder"], event["upload"], event["reason_code"]) == ("no-such-site", "visit7",
                                                                               "upload_site_unknown")
    assert not any(f.name in str(event) for f in files)  # the folder and upload names only
    assert len([r for r in caplog.records if "no-such-site" in r.getMessage()]) == 1


def test_the_background_thread_hands_over_and_stops(watcher, root):
    calls = Calls()
    w = watcher(calls, quiet_s=0.3, interval_s=0.05, keep_staged=False).start()
    try:
        files = dicom_files(*XA30)
        drop(root, "siemens-xa30", "scan", files)
        with calls.changed:
            assert calls.changed.wait_for(lambda: calls.calls, timeout=20)
    finally:
        w.stop()
    [(site, path, seen)] = calls.calls
    assert site == "siemens-xa30" and seen == sources(files)
    assert not os.path.exists(path)                     # keep_staged=False: removed once handed
    assert w._thread is None


def test_an_unlistable_drop_root_is_a_named_error(trial, lake):
    w = DropWatcher(trial, lake, "s3://corelab-no-bucket/drop", {
        "key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})
    with pytest.raises(WatcherError, match="s3://corelab-no-bucket/drop cannot be listed"):
        w.start()


# -- an S3 drop root (moto's S3 server) ------------------------------------------------------

@pytest.fixture
def moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    finally:
        server.stop()


def test_s3_drop_root_hands_local_byte_identical_copies(trial, moto, tmp_path):
    lake = Lake("s3://corelab-lake/trial", moto)
    lake.fs.mkdir("corelab-lake")                        # no region: moto refuses us-east-1 as a constraint
    drop_root = Lake("s3://corelab-drops/site-drops", moto)
    drop_root.fs.mkdir("corelab-drops")
    files = dicom_files(*SI_STUDY)
    # upload 1: a folder of series, a .dcm.gz and a zip, and a READY marker
    xa30 = dicom_files(*XA30)[0]
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        for f in files[4:6]:
            zf.write(f, f"{f.parent.name}/{f.name}")
    sent = {f"{f.parent.name}/{f.name}": f.read_bytes() for f in files[:4]}
    sent[f"{xa30.name}.gz"] = gzip.compress(xa30.read_bytes())
    sent["more.zip"] = zipped.getvalue()
    for rel, data in sent.items():
        drop_root.write_bytes(f"uploads/{SITE}/visit1/{rel}", data)
    drop_root.write_bytes(f"uploads/{SITE}/visit1/{READY}", b"")
    # upload 2: no marker, done when quiet
    quiet = {f"{f.parent.name}/{f.name}": f.read_bytes() for f in files[6:]}
    for rel, data in quiet.items():
        drop_root.write_bytes(f"uploads/{SITE}/visit2/{rel}", data)
    # what S3 clients also leave (raw keys, not normalised): a console's folder marker, a Windows
    # client's backslash path, and a key naming ".." (a dot-name: never handed over, never followed)
    prefix = f"corelab-drops/site-drops/uploads/{SITE}"
    drop_root.fs.pipe_file(f"{prefix}/visit1/", b"")
    backslash = f"mr_0099\\{xa30.name}"
    drop_root.fs.pipe_file(f"{prefix}/visit2/{backslash}", xa30.read_bytes())
    drop_root.fs.pipe_file(f"{prefix}/visit2/a/../../escape.dcm", xa30.read_bytes())

    calls = Calls()
    w = DropWatcher(trial, lake, "s3://corelab-drops/site-drops", moto, quiet_s=QUIET, on_upload_ready=calls,
                    work_dir=tmp_path / "work")
    w.start().stop()                                    # the listing works; the thread is not needed here
    [first] = w.poll(now=0.0)
    assert (first.upload, first.ready_by) == ("visit1", "marker")
    assert calls.calls[0][0] == SITE and calls.calls[0][2] == sent
    assert str(tmp_path / "work") in calls.calls[0][1]
    assert w.poll(now=QUIET - 1) == []
    [second] = w.poll(now=QUIET)
    assert (second.upload, second.ready_by) == ("visit2", "quiet")
    assert calls.calls[1][2] == {**quiet, local_rel(backslash): xa30.read_bytes()}   # one flat name
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [SITE]
    inv = inventory_upload(Path(first.path))            # the .gz and the zip's members are read as DICOM
    assert len(inv.accepted) == 4 + 1 + 2 and inv.rejected == []
    # a restart reads its markers from the S3 lake and hands nothing over again
    again = Calls()
    assert DropWatcher(trial, lake, "s3://corelab-drops/site-drops", moto, quiet_s=QUIET, on_upload_ready=again,
                       work_dir=tmp_path / "work").poll(now=1e4) == []
    assert again.calls == []
    assert [e["upload"] for e in events(lake, "upload_ready")] == ["visit1", "visit2"]
