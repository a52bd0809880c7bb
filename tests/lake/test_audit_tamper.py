"""The audit log against an insider who can write the lake, but holds neither the key nor the anchor.

A real chain of ten events is appended through ``append_event`` with a key and an anchor folder
(both outside the lake), then tampered with the way someone with write access to the lake's files
would: by editing the files, recomputing sha256 hashes where the case says so. Each of the twelve
cases must be reported by :func:`verify_chain` and by ``corelab audit verify`` (exit 1, one line per
problem). Cases 7-11 are also checked to fool the plain hash chain (verified without key and
anchor): the forgery is good, and only the key or the anchor catches it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.lake.audit import (
    HEAD,
    AnchorInvalid,
    AuditError,
    FsspecAnchor,
    append,
    append_event,
    event_path,
    lake_id,
    open_anchor,
    read_events,
    verify_chain,
)
from tasks.lake.storage import Lake, StorageUnavailable

KEY = "tamper-test-audit-key"
N = 10


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """A lake whose log holds ten real events, keyed, anchored in a folder beside the lake."""
    monkeypatch.setenv("CORELAB_AUDIT_KEY", KEY)
    monkeypatch.setenv("CORELAB_AUDIT_ANCHOR", str(tmp_path / "anchor"))
    lake = Lake(str(tmp_path / "lake")).init()
    for i in range(N):
        study = hashlib.sha256(f"study {i}".encode()).hexdigest()[:16]
        if i % 3 == 2:
            append_event(lake, "qc_override", actor=f"reviewer-{i}", series_uid=f"2.25.{i}", verdict="PASS",
                         reason="looked at it")
        else:
            append_event(lake, "study_received", study_key=study, site="ge-nih", n_files=10 + i)
    return lake


# -- what an insider does to the files ----------------------------------------------------------
def _file(lake: Lake, seq: int) -> Path:
    return Path(lake.path(event_path(seq)))


def _read(lake: Lake, seq: int) -> dict:
    return json.loads(_file(lake, seq).read_text())


def _write(lake: Lake, seq: int, event: dict) -> None:
    _file(lake, seq).write_text(json.dumps(event))


def _sha256(event: dict) -> str:
    """The plain hash anyone can recompute: sha256 of the sorted, compact JSON of the body."""
    body = {k: v for k, v in event.items() if k not in ("hash", "hmac")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_head(lake: Lake, seq: int, hash_: str) -> None:
    Path(lake.path(HEAD)).write_text(json.dumps({"seq": seq, "hash": hash_}))


def _rechain(lake: Lake, start: int) -> None:
    """Recompute every hash from ``start`` on, and the head, so the plain chain is whole again."""
    prev = _read(lake, start - 1)["hash"] if start > 1 else "0" * 64
    seq = start
    while _file(lake, seq).exists():
        event = _read(lake, seq)
        event["prev_hash"] = prev
        event["hash"] = prev = _sha256(event)
        _write(lake, seq, event)
        seq += 1
    _write_head(lake, seq - 1, prev)


def edit_event(lake):
    event = _read(lake, 4)
    event["details"]["n_files"] += 1
    _write(lake, 4, event)


def delete_event(lake):
    _file(lake, 4).unlink()


def reorder_events(lake):
    a, b = _file(lake, 4).read_bytes(), _file(lake, 5).read_bytes()
    _file(lake, 4).write_bytes(b)
    _file(lake, 5).write_bytes(a)


def forge_with_wrong_hash(lake):
    event = dict(_read(lake, N), seq=N + 1, action="qc_override", actor="someone")
    _write(lake, N + 1, event)                       # the hash of event 10, not its own


def cut_last_file(lake):
    _file(lake, N).unlink()


def corrupt_event(lake):
    data = _file(lake, 6).read_bytes()
    _file(lake, 6).write_bytes(data[: len(data) // 2])   # a torn write: not JSON any more


def forge_with_correct_hash_and_head(lake):
    last = _read(lake, N)
    event = {"seq": N + 1, "at": last["at"], "actor": "reviewer-2", "action": "qc_override",
             "details": {"series_uid": "2.25.99", "verdict": "PASS", "reason": "fine"},
             "prev_hash": last["hash"], "key_id": last["key_id"]}
    event["hash"] = _sha256(event)
    event["hmac"] = last["hmac"]                     # the best an insider without the key can do
    _write(lake, N + 1, event)
    _write_head(lake, N + 1, event["hash"])


def cut_tail_and_rewrite_head(lake):
    for seq in (N - 1, N):
        _file(lake, seq).unlink()
    _write_head(lake, N - 2, _read(lake, N - 2)["hash"])


def edit_and_recompute_hashes(lake):
    event = _read(lake, 4)
    event["details"]["n_files"] += 1
    _write(lake, 4, event)
    _rechain(lake, 4)


def delete_and_renumber(lake):
    _file(lake, 5).unlink()
    for seq in range(6, N + 1):
        event = _read(lake, seq)
        _file(lake, seq).unlink()
        _write(lake, seq - 1, dict(event, seq=seq - 1))
    _rechain(lake, 5)


def delete_whole_log(lake):
    shutil.rmtree(lake.path("audit"))


def delete_events_keep_head(lake):
    shutil.rmtree(lake.path("audit/events"))


# (tamper, what must be reported with key and anchor, fools the plain hash chain)
CASES = {
    "01-edit-event": (edit_event, {"hash", "hmac"}, False),
    "02-delete-event": (delete_event, {"gap", "anchor_ahead"}, False),
    "03-reorder-events": (reorder_events, {"sequence", "link"}, False),
    "04-forged-event-wrong-hash": (forge_with_wrong_hash, {"hash", "head"}, False),
    "05-cut-last-file": (cut_last_file, {"head", "anchor_ahead"}, False),
    "06-corrupt-event": (corrupt_event, {"unreadable"}, False),
    "07-forged-event-correct-hash-and-head": (forge_with_correct_hash_and_head, {"hmac"}, True),
    "08-cut-tail-rewrite-head": (cut_tail_and_rewrite_head, {"anchor_ahead"}, True),
    "09-edit-and-recompute-every-later-hash": (edit_and_recompute_hashes, {"hmac", "anchor_mismatch"}, True),
    "10-delete-and-renumber": (delete_and_renumber, {"hmac", "anchor_ahead"}, True),
    "11-delete-whole-log": (delete_whole_log, {"anchor_ahead"}, True),
    "12-delete-events-keep-head": (delete_events_keep_head, {"head", "anchor_ahead"}, False),
}


def _cli(lake: Lake, *extra: str):
    from flows.cli import app

    return CliRunner().invoke(app, ["audit", "verify", "--lake", lake.url, *extra])


def test_the_clean_chain_is_intact_keyed_and_anchored(chain):
    report = verify_chain(chain)
    assert report.ok and report.problems == [] and report.notes == []
    assert (report.events, report.keyed, report.anchored, report.anchor_seq) == (N, True, True, N)
    events = read_events(chain)
    assert [e["seq"] for e in events] == list(range(1, N + 1))
    assert {e["actor"] for e in events} >= {"corelab", "reviewer-2"}
    # the key is in no file of the lake or of the anchor store
    anchor_dir = Path(open_anchor(chain).where)
    for path in [*Path(chain.root).rglob("*"), *anchor_dir.rglob("*")]:
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path
    res = _cli(chain)
    assert res.exit_code == 0, res.output
    assert f"audit log intact: {N} events" in res.output
    assert "keyed: HMAC-SHA256" in res.output and f"anchored: {anchor_dir}" in res.output


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_reported(chain, case):
    tamper, expected, fools_plain_chain = CASES[case]
    assert verify_chain(chain).ok
    tamper(chain)
    report = verify_chain(chain)
    assert not report.ok
    assert expected <= set(report.kinds), (case, report.kinds, report.problems)
    assert all("\n" not in p for p in report.problems)
    plain = verify_chain(chain, key=None, anchor=None)
    assert plain.ok == fools_plain_chain, (case, plain.problems)
    res = _cli(chain)
    assert res.exit_code == 1, res.output
    for p in report.problems:
        assert p in res.output
    assert f"audit log broken: {len(report.problems)} problem(s)" in res.output


def test_an_append_after_a_cut_is_refused_and_writes_nothing(chain):
    cut_tail_and_rewrite_head(chain)
    with pytest.raises(AuditError, match=f"ends at event {N - 2} but the anchor .* records event {N}"):
        append_event(chain, "study_received", study_key="k")
    assert not _file(chain, N - 1).exists()
    delete_whole_log(chain)
    with pytest.raises(AuditError, match="ends at event 0"):
        append_event(chain, "study_received", study_key="k")
    assert not chain.exists("audit/events")


def test_the_anchor_never_goes_backwards(chain, tmp_path):
    anchor = open_anchor(chain)
    lid = lake_id(chain)
    before = anchor.get(lid)
    assert before["seq"] == N and before["hash"] == _read(chain, N)["hash"]
    older = _read(chain, N - 3)
    with pytest.raises(AuditError, match=f"refused to move back from event {N} to event {N - 3}"):
        anchor.put(lid, {"lake": lid, "seq": N - 3, "hash": older["hash"], "hmac": older["hmac"], "at": "x"})
    with pytest.raises(AuditError, match=f"event {N} .* another hash"):
        anchor.put(lid, dict(before, hash="f" * 64))
    assert anchor.get(lid) == before
    # a second store object on the same folder (another worker) sees and keeps the same record
    assert FsspecAnchor(anchor.where).get(lid) == before
    append_event(chain, "study_received", study_key="k")
    assert anchor.get(lid)["seq"] == N + 1


def test_a_key_mismatch_is_reported_as_such(chain, monkeypatch):
    monkeypatch.setenv("CORELAB_AUDIT_KEY", "another-key-entirely")
    report = verify_chain(chain)
    assert not report.ok and report.kinds == ["key_mismatch"] and "wrong key?" in report.problems[0]
    res = _cli(chain)
    assert res.exit_code == 1 and "key mismatch" in res.output


def test_without_key_or_anchor_the_log_is_appended_and_said_to_be_unanchored(tmp_path, monkeypatch):
    monkeypatch.delenv("CORELAB_AUDIT_KEY")
    monkeypatch.delenv("CORELAB_AUDIT_ANCHOR", raising=False)
    lake = Lake(str(tmp_path / "lake")).init()
    for i in range(3):
        event = append_event(lake, "study_received", n=i)
        assert "hmac" not in event and "key_id" not in event
    report = verify_chain(lake)
    assert report.ok and not report.keyed and not report.anchored
    res = _cli(lake)
    assert res.exit_code == 0, res.output
    assert "NOT keyed: CORELAB_AUDIT_KEY is not set" in res.output and "NOT anchored" in res.output
    assert "audit log intact as far as it can be checked: 3 events (not keyed, not anchored)" in res.output
    assert _cli(lake, "--require-anchor").exit_code == 1
    # keyed from here on: the unkeyed events before are covered through the chain
    monkeypatch.setenv("CORELAB_AUDIT_KEY", KEY)
    assert verify_chain(lake).kinds == ["unkeyed"]      # nothing shows who wrote an all-unkeyed log
    append_event(lake, "study_received", n=3)
    report = verify_chain(lake)
    assert report.ok and report.keyed and report.notes == [
        "events 1-3: unkeyed, written before keying began; event 4's HMAC covers them through the hash chain"]


def test_a_stripped_hmac_after_keyed_events_is_reported(chain):
    event = _read(chain, 7)
    del event["hmac"], event["key_id"]
    _write(chain, 7, event)
    _rechain(chain, 7)
    for seq in range(8, N + 1):                    # the insider strips the rest too
        event = _read(chain, seq)
        del event["hmac"], event["key_id"]
        _write(chain, seq, event)
    _rechain(chain, 7)
    report = verify_chain(chain)
    assert "unkeyed" in report.kinds and "anchor_mismatch" in report.kinds
    assert verify_chain(chain, key=None, anchor=None).ok


def test_an_interrupted_append_is_taken_up_and_never_overwritten(chain):
    head = Path(chain.path(HEAD)).read_bytes()
    stopped = append(chain, "study_received", "corelab", {"n": 1}, key=KEY.encode(), anchor=None)
    Path(chain.path(HEAD)).write_bytes(head)        # stopped after the event, before the head and anchor
    before = _file(chain, N + 1).read_bytes()
    nxt = append_event(chain, "study_received", n=2)
    assert nxt["seq"] == N + 2 and nxt["prev_hash"] == stopped["hash"]
    assert _file(chain, N + 1).read_bytes() == before
    assert verify_chain(chain).ok


def test_an_event_beyond_the_head_that_does_not_follow_it_is_never_overwritten(chain):
    forge_with_correct_hash_and_head(chain)
    _write_head(chain, N, _read(chain, N)["hash"])   # the forged event 11 sits beyond the head
    forged = _file(chain, N + 1).read_bytes()
    with pytest.raises(AuditError, match=f"event {N + 1} exists beyond the head and its HMAC does not verify"):
        append_event(chain, "study_received", n=1)
    assert _file(chain, N + 1).read_bytes() == forged


def test_an_anchor_inside_the_lake_is_refused(chain, monkeypatch):
    monkeypatch.setenv("CORELAB_AUDIT_ANCHOR", chain.path("reports/anchor"))
    with pytest.raises(AnchorInvalid, match="inside the lake"):
        append_event(chain, "study_received", n=1)
    report = verify_chain(chain)
    assert report.kinds == ["anchor_invalid"]
    res = _cli(chain)
    assert res.exit_code == 1 and "inside the lake" in res.output


class _Unreachable:
    """An anchor backend whose store cannot be written for now (the network boundary), reads pass."""

    def __init__(self, inner):
        self.inner, self.where = inner, inner.where

    def get(self, lake_id):
        return self.inner.get(lake_id)

    def put(self, lake_id, record):
        raise StorageUnavailable(f"anchor {self.where}: put failed: ConnectionResetError")


def test_an_anchor_that_cannot_be_written_lags_and_the_next_append_catches_up(chain, caplog):
    anchor = open_anchor(chain)
    event = append(chain, "study_received", "corelab", {"n": 1}, key=KEY.encode(), anchor=_Unreachable(anchor))
    assert event["seq"] == N + 1 and "not moved to event 11" in caplog.text
    report = verify_chain(chain)
    assert report.ok and report.anchor_seq == N and report.notes == [
        "event 11: after the last anchored event (an append stopped before its checkpoint, or was added since)"]
    append_event(chain, "study_received", n=2)
    report = verify_chain(chain)
    assert report.ok and report.anchor_seq == N + 2 and report.notes == []


@pytest.fixture(scope="module")
def s3_opts():
    """moto's S3 server on 127.0.0.1 with a lake bucket and a separate anchor bucket; stopped after.

    (moto keeps one store per process: the buckets are named for this module alone.)
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    for bucket in ("tamper-lake", "tamper-anchor"):
        client.create_bucket(Bucket=bucket)
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    server.stop()


def test_an_s3_lake_anchored_in_another_bucket(s3_opts):
    lake = Lake("s3://tamper-lake/trial1", s3_opts).init()
    anchor = FsspecAnchor("s3://tamper-anchor/corelab", s3_opts)
    for i in range(4):
        append(lake, "study_received", "corelab", {"n": i}, key=KEY.encode(), anchor=anchor)
    report = verify_chain(lake, key=KEY.encode(), anchor=anchor)
    assert report.ok and report.keyed and report.anchor_seq == 4 and report.anchor == "s3://tamper-anchor/corelab"
    for seq in (3, 4):                                   # cut the tail, rewrite the head
        lake.remove(event_path(seq))
    lake.write_bytes(HEAD, json.dumps({"seq": 2, "hash": json.loads(lake.read_text(event_path(2)))["hash"]})
                     .encode())
    assert verify_chain(lake, key=None, anchor=None).ok
    assert verify_chain(lake, key=KEY.encode(), anchor=anchor).kinds == ["anchor_ahead"]
    with pytest.raises(AuditError, match="ends at event 2 but the anchor s3://tamper-anchor/corelab records event 4"):
        append(lake, "study_received", "corelab", {"n": 9}, key=KEY.encode(), anchor=anchor)
    with pytest.raises(AnchorInvalid, match="inside the lake"):
        open_anchor(lake, "s3://tamper-lake/trial1/anchor")
