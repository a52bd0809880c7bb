"""Append-only, hash-chained, keyed and anchored audit log of every step.

Each event is one JSON object under ``audit/events/<seq>.json`` holding the
hash of the event before it; ``audit/head.json`` names the last event. One
object per event (rather than one growing file) because object stores cannot
append, and an event file is written create-only, so a sequence number is never
overwritten. Changing, removing or reordering any event breaks the chain, which
:func:`verify_chain` reports by sequence number.

A hash chain alone proves nothing against someone who can write the lake: they
can recompute every hash. Two things outside the lake anchor it.

Key (``CORELAB_AUDIT_KEY``)
    Every event also carries ``hmac``, HMAC-SHA256 under this key of the same
    canonical body the plain ``hash`` covers (which includes ``prev_hash``, so a
    keyed event vouches for every event before it), and ``key_id``, a
    fingerprint of the key that tells a wrong key from an edit. The lake never
    holds the key: every worker that appends (receive, process, harmonize, the
    CLI) and whoever runs ``corelab audit verify`` gets it from the environment
    or a Prefect Secret block. Without it events are still appended, unkeyed,
    and verification says the log is not keyed.
Anchor (``CORELAB_AUDIT_ANCHOR``)
    A folder or fsspec URL outside the lake, writable by corelab's workers but
    not by the lake's other writers, holding per lake the last event's
    ``(seq, hash, hmac)``. Every append checks the lake against it first (a lake
    behind its anchor is refused: history was cut), then moves it forward; it
    never moves back. :class:`AnchorStore` is the two-method protocol a Prefect
    Variable or artifact backend would implement; :class:`FsspecAnchor` is the
    one shipped.

With both configured, :func:`verify_chain` detects an edited, deleted,
reordered, renumbered or forged event, a cut tail, and a deleted log or event
folder, even when the hashes and the head were recomputed to match.

Audit events must never carry PHI: callers pass study keys, lake paths of
de-identified data and sha256 digests, never original names, IDs or UIDs.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from tasks.errors import CorelabError, is_transient
from tasks.lake.storage import Lake

HEAD = "audit/head.json"
EVENTS = "audit/events"
GENESIS = "0" * 64
KEY_ENV = "CORELAB_AUDIT_KEY"
ANCHOR_ENV = "CORELAB_AUDIT_ANCHOR"

log = logging.getLogger("corelab.audit")


class AuditError(CorelabError):
    """The lake's log disagrees with its anchor or its key: nothing more is appended to it."""

    code = "audit_chain_broken"


class AnchorInvalid(CorelabError, ValueError):
    """The anchor store cannot anchor this lake (inside it, or its record is unreadable)."""

    code = "audit_anchor_invalid"


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def event_path(seq: int) -> str:
    return f"audit/events/{seq:012d}.json"


# -- the key -------------------------------------------------------------------------------------
def audit_key() -> bytes | None:
    """The HMAC key from ``$CORELAB_AUDIT_KEY``, or None when it is not set."""
    value = os.environ.get(KEY_ENV)
    return value.encode("utf-8") if value else None


def key_id(key: bytes) -> str:
    """A fingerprint of the key (names it in events and messages; reveals nothing of it)."""
    return hmac.new(key, b"corelab audit key id", hashlib.sha256).hexdigest()[:16]


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


# -- the anchor ----------------------------------------------------------------------------------
class AnchorStore(Protocol):
    """Where the last event of each lake is checkpointed, out of the lake writers' reach.

    ``put`` must refuse (:class:`AuditError`) a record that goes backwards: a lower ``seq``, or
    the same ``seq`` with another ``hash`` (:func:`check_forward`). A record is a dict with
    ``lake``, ``seq``, ``hash``, ``hmac`` (None for an unkeyed event) and ``at``.
    """

    where: str

    def get(self, lake_id: str) -> dict[str, Any] | None: ...

    def put(self, lake_id: str, record: dict[str, Any]) -> None: ...


def check_forward(current: dict[str, Any] | None, new: dict[str, Any], where: str) -> None:
    """Raise :class:`AuditError` if ``new`` would move the anchor ``current`` backwards."""
    if current is None:
        return
    if new["seq"] < current["seq"]:
        raise AuditError(f"audit anchor {where}: refused to move back from event {current['seq']} "
                         f"to event {new['seq']} of {new.get('lake')}")
    if new["seq"] == current["seq"] and new["hash"] != current["hash"]:
        raise AuditError(f"audit anchor {where}: event {new['seq']} of {new.get('lake')} is anchored "
                         "with another hash: refused to replace it")


class FsspecAnchor:
    """An anchor store in a folder or fsspec URL (``/srv/corelab-anchor``, ``s3://other-bucket/anchor``).

    One small JSON object per lake, named by a hash of the lake's URL, written atomically and
    read, checked and replaced under the store's own lock (:meth:`Lake.lock`). The store must be
    one the lake's writers cannot change: another bucket or folder, writable by corelab's
    workers' credentials only.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.store = Lake(url, storage_options or {})
        self.where = self.store.uri()

    @staticmethod
    def _rel(lake_id: str) -> str:
        return hashlib.sha256(lake_id.encode()).hexdigest()[:32] + ".json"

    def get(self, lake_id: str) -> dict[str, Any] | None:
        rel = self._rel(lake_id)
        if not self.store.exists(rel):
            return None
        try:
            record = json.loads(self.store.read_text(rel))
            if not isinstance(record, dict) or not isinstance(record.get("seq"), int) \
                    or not isinstance(record.get("hash"), str):
                raise ValueError("not an anchor record")
        except (ValueError, UnicodeDecodeError) as exc:
            raise AnchorInvalid(f"audit anchor {self.store.uri(rel)}: unreadable record ({exc})") from exc
        if record.get("lake") != lake_id:
            raise AnchorInvalid(f"audit anchor {self.store.uri(rel)}: holds the record of "
                                f"{record.get('lake')!r}, not of {lake_id!r}")
        return record

    def put(self, lake_id: str, record: dict[str, Any]) -> None:
        rel = self._rel(lake_id)
        with self.store.lock(rel):
            current = self.get(lake_id)
            check_forward(current, record, self.where)
            if current is None or current["seq"] != record["seq"]:
                self.store.write_bytes(rel, _canonical(record))


def lake_id(lake: Lake) -> str:
    """The name a lake's record has in an anchor store: the lake's full URL."""
    return lake.uri()


@functools.lru_cache(maxsize=8)
def _fsspec_anchor(url: str) -> FsspecAnchor:
    return FsspecAnchor(url)


def open_anchor(lake: Lake, url: str | None = None) -> AnchorStore | None:
    """The anchor store at ``url``, else ``$CORELAB_AUDIT_ANCHOR``; None when neither is set.

    Raises
    ------
    AnchorInvalid
        The anchor store is the lake or inside it: the lake's writers could rewrite it.
    """
    url = url or os.environ.get(ANCHOR_ENV)
    if not url:
        return None
    anchor = _fsspec_anchor(url)
    where, root = anchor.where.rstrip("/"), lake.uri().rstrip("/")
    if anchor.store.is_local and lake.is_local:
        where, root = os.path.realpath(where), os.path.realpath(root)
    if where == root or where.startswith(root + "/"):
        raise AnchorInvalid(f"audit anchor {anchor.where} is inside the lake {lake.uri()}: "
                            "it must be a store the lake's writers cannot change")
    return anchor


# -- appending -----------------------------------------------------------------------------------
def _write_new(lake: Lake, rel: str, data: bytes) -> None:
    """Write ``rel`` only if it does not exist (FileExistsError otherwise)."""
    write_new = getattr(lake, "write_new", None)
    if write_new is not None:
        write_new(rel, data)
        return
    # A lake without a create-only write: the check is made under the audit lock the caller
    # holds, so no other appender of this lake writes between the check and the write.
    if lake.exists(rel):
        raise FileExistsError(lake.uri(rel))
    lake.write_bytes(rel, data)


def _read_head(lake: Lake) -> dict[str, Any]:
    if not lake.exists(HEAD):
        return {"seq": 0, "hash": GENESIS}
    try:
        head = json.loads(lake.read_text(HEAD))
        if not isinstance(head, dict) or not isinstance(head.get("seq"), int) \
                or not isinstance(head.get("hash"), str):
            raise ValueError("not a head record")
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuditError(f"{lake.uri(HEAD)}: unreadable ({exc}); nothing is appended until an operator "
                         "has run `corelab audit verify`") from exc
    return head


def _event_problem(event: Any, prev_hash: str, key: bytes | None) -> str | None:
    """Why ``event`` cannot follow an event hashed ``prev_hash`` (None if it can)."""
    if not isinstance(event, dict):
        return "not an event"
    body = {k: v for k, v in event.items() if k not in ("hash", "hmac")}
    canonical = _canonical(body)
    if not hmac.compare_digest(hashlib.sha256(canonical).hexdigest(), str(event.get("hash"))):
        return "its content does not match its hash"
    if event.get("prev_hash") != prev_hash:
        return "its prev_hash does not name the event before it"
    if key is not None and not hmac.compare_digest(_mac(key, canonical), str(event.get("hmac"))):
        return "its HMAC does not verify with this key (or it has none)"
    return None


def _read_event(lake: Lake, seq: int) -> Any:
    try:
        return json.loads(lake.read_text(event_path(seq)))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return "unreadable"


def _refuse(lake: Lake, why: str) -> AuditError:
    return AuditError(f"audit log of {lake.uri()}: {why}; nothing is appended until an operator has "
                      "run `corelab audit verify`")


def _check_against_anchor(lake: Lake, head: dict[str, Any], record: dict[str, Any] | None,
                          key: bytes | None, where: str) -> None:
    """Refuse to extend a log that is behind its anchor or left the anchored history."""
    if record is None:
        return
    seq, anchored = record["seq"], record["hash"]
    if seq > head["seq"]:
        raise _refuse(lake, f"the log ends at event {head['seq']} but the anchor {where} records event {seq} "
                            "(events were cut or deleted)")
    if seq == head["seq"]:
        if head.get("hash") != anchored:
            raise _refuse(lake, f"event {seq} differs from the one the anchor {where} records (history rewritten)")
        return
    # the anchor lags (an append stopped before its checkpoint): the events since must follow it
    if seq > 0:
        event = _read_event(lake, seq)
        if not isinstance(event, dict) or event.get("hash") != anchored:
            raise _refuse(lake, f"event {seq} differs from the one the anchor {where} records (history rewritten)")
    prev = anchored
    for s in range(seq + 1, head["seq"] + 1):
        event = _read_event(lake, s)
        why = _event_problem(event, prev, key) if event is not None else "it is missing"
        if why is None and event.get("seq") != s:
            why = f"it says it is event {event.get('seq')}"
        if why:
            raise _refuse(lake, f"event {s}, after the last anchored event {seq}: {why}")
        prev = event["hash"]
    if prev != head.get("hash"):
        raise _refuse(lake, f"the head names event {head['seq']} with another hash than the log's")


def append(lake: Lake, action: str, actor: str, details: dict[str, Any], *,
           key: bytes | None, anchor: AnchorStore | None) -> dict[str, Any]:
    """Append one event with an explicit key and anchor (:func:`append_event` takes them from the environment).

    Raises
    ------
    AuditError
        The log is behind its anchor, left the anchored history, or holds an event at the next
        sequence number that does not follow the head.
    """
    with lake.lock("audit"):
        head = _read_head(lake)
        lid = lake_id(lake)
        if anchor is not None:
            _check_against_anchor(lake, head, anchor.get(lid), key, anchor.where)
        while True:
            body: dict[str, Any] = {
                "seq": head["seq"] + 1,
                "at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "actor": actor,
                "action": action,
                "details": details,
                "prev_hash": head["hash"],
            }
            if key is not None:
                body["key_id"] = key_id(key)
            canonical = _canonical(body)
            event = dict(body, hash=hashlib.sha256(canonical).hexdigest())
            if key is not None:
                event["hmac"] = _mac(key, canonical)
            try:
                _write_new(lake, event_path(event["seq"]), _canonical(event))
                break
            except FileExistsError:
                # an append that stopped before moving the head, or a concurrent writer: the event
                # there is taken as the head only if it follows the head (and is keyed, with a key)
                there = _read_event(lake, event["seq"])
                why = _event_problem(there, head["hash"], key)
                if why is None and there.get("seq") != event["seq"]:
                    why = f"it says it is event {there.get('seq')}"
                if why:
                    raise _refuse(lake, f"event {event['seq']} exists beyond the head and {why}") from None
                head = {"seq": there["seq"], "hash": there["hash"]}
        lake.write_bytes(HEAD, _canonical({"seq": event["seq"], "hash": event["hash"]}))
        if anchor is not None:
            record = {"lake": lid, "seq": event["seq"], "hash": event["hash"], "hmac": event.get("hmac"),
                      "at": event["at"]}
            try:
                anchor.put(lid, record)
            except CorelabError as exc:
                if not is_transient(exc):
                    raise
                # the event stands (retrying the caller would append it twice); the next append
                # checks the events since the anchor and moves it on
                log.warning("audit anchor %s not moved to event %s: %s", anchor.where, event["seq"], exc)
    return event


def append_event(lake: Lake, action: str, actor: str = "corelab", **details: Any) -> dict[str, Any]:
    """Append one event; returns it with its ``seq``, ``hash`` and (keyed) ``hmac``.

    The key is ``$CORELAB_AUDIT_KEY`` and the anchor ``$CORELAB_AUDIT_ANCHOR``; without them the
    event is still appended, unkeyed or unanchored.
    """
    return append(lake, action, actor, details, key=audit_key(), anchor=open_anchor(lake))


# -- verifying -----------------------------------------------------------------------------------
@dataclass
class ChainReport:
    """What :func:`verify_chain` found.

    ``ok`` means no problem was found; ``keyed`` and ``anchored`` say how much that proves: a log
    that is neither could have been rewritten whole by anyone who can write the lake.
    """

    events: int
    ok: bool
    problems: list[str]
    kinds: list[str] = field(default_factory=list)   # one per problem: a stable word tests and tools match
    keyed: bool = False          # a key was given and the log's last event is keyed with it
    anchored: bool = False       # an anchor store holds a record for this lake
    key_id: str | None = None
    anchor: str | None = None    # where the anchor store is
    anchor_seq: int | None = None
    notes: list[str] = field(default_factory=list)


class _FromEnv:
    def __repr__(self) -> str:
        return "<from the environment>"


FROM_ENV: Any = _FromEnv()


def _events(seqs: list[int]) -> str:
    """``event 3`` or ``events 3-10, 12``."""
    spans: list[list[int]] = []
    for s in seqs:
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"event {text}" if len(seqs) == 1 else f"events {text}"


def verify_chain(lake: Lake, *, key: bytes | None = FROM_ENV, anchor: AnchorStore | None = FROM_ENV) -> ChainReport:
    """Recompute every hash, link and HMAC and compare the log with its anchor; list every problem.

    Parameters
    ----------
    lake
        The lake whose ``audit/`` is checked.
    key, anchor
        The HMAC key and the anchor store; by default ``$CORELAB_AUDIT_KEY`` and
        ``$CORELAB_AUDIT_ANCHOR``. None checks without them (the report says so).
    """
    key = audit_key() if key is FROM_ENV else key
    problems: list[str] = []
    kinds: list[str] = []
    notes: list[str] = []

    def problem(kind: str, message: str) -> None:
        kinds.append(kind)
        problems.append(message)

    try:
        anchor = open_anchor(lake) if anchor is FROM_ENV else anchor
    except AnchorInvalid as exc:
        problem("anchor_invalid", str(exc))
        anchor = None

    numbered: list[tuple[int, str]] = []
    for rel in lake.find(EVENTS):
        stem = posixpath.basename(rel).removesuffix(".json")
        if stem.isdigit() and rel == event_path(int(stem)):
            numbered.append((int(stem), rel))
        elif rel.endswith(".json"):
            problem("sequence", f"{rel}: not an event's file name")
    numbered.sort()
    by_path: dict[str, dict[str, Any]] = {}
    own_id = key_id(key) if key is not None else None
    bad_mac: list[int] = []
    foreign: dict[str, list[int]] = {}
    keyed_seqs: list[int] = []
    unkeyed: list[int] = []
    prev: str | None = GENESIS          # the hash the next event must name (None: not checkable)
    last_seq = 0
    for seq, rel in numbered:
        if seq != last_seq + 1:
            problem("gap", f"{_events(list(range(last_seq + 1, seq)))} missing: the log jumps from "
                           f"{last_seq} to {seq}")
            prev = None                 # the gap explains the broken link
        last_seq = seq
        try:
            event = json.loads(lake.read_text(rel))
            if not isinstance(event, dict):
                raise ValueError(f"a JSON {type(event).__name__}, not an event object")
        except (ValueError, UnicodeDecodeError) as exc:
            problem("unreadable", f"{rel}: not a valid event ({str(exc).splitlines()[0]})")
            prev = None
            continue
        by_path[rel] = event
        if event.get("seq") != seq:
            problem("sequence", f"{rel}: holds event {event.get('seq')} (moved, renumbered or reordered)")
        claimed = event.get("hash")
        canonical = _canonical({k: v for k, v in event.items() if k not in ("hash", "hmac")})
        if hashlib.sha256(canonical).hexdigest() != claimed:
            problem("hash", f"event {seq}: content does not match its hash (edited or forged)")
        if prev is not None and event.get("prev_hash") != prev:
            problem("link", f"event {seq}: prev_hash is not event {seq - 1}'s hash")
        prev = claimed if isinstance(claimed, str) else None
        if key is None:
            continue
        if "hmac" not in event:
            unkeyed.append(seq)
        elif event.get("key_id") != own_id:
            foreign.setdefault(str(event.get("key_id")), []).append(seq)
        elif not hmac.compare_digest(_mac(key, canonical), str(event["hmac"])):
            bad_mac.append(seq)
        else:
            keyed_seqs.append(seq)
    count = len(numbered)

    if lake.exists(HEAD):
        try:
            head = json.loads(lake.read_text(HEAD))
            if not isinstance(head, dict):
                raise ValueError("not a head record")
        except (ValueError, UnicodeDecodeError) as exc:
            problem("head", f"{HEAD}: unreadable ({str(exc).splitlines()[0]})")
        else:
            last = by_path.get(event_path(last_seq), {})
            if numbered and head.get("seq") != last_seq:
                problem("head", f"head names event {head.get('seq')} but the log ends at event {last_seq}")
            elif numbered and head.get("hash") != last.get("hash"):
                problem("head", f"head names event {last_seq} with another hash than the log's")
            elif not numbered and head.get("seq"):
                problem("head", f"head names event {head.get('seq')} but the log holds no event (events deleted)")
    elif numbered:
        problem("head", f"{HEAD} is missing")

    keyed = False
    if key is not None:
        if bad_mac:
            problem("hmac", f"{_events(bad_mac)}: HMAC does not verify (edited, or forged without the key)")
        for other, seqs in foreign.items():
            if not keyed_seqs and not bad_mac and len(foreign) == 1:
                problem("key_mismatch", f"key mismatch: the log is keyed with key id {other}, the key in use has id "
                                        f"{own_id}: wrong key? (no HMAC checked)")
            else:
                problem("key_mismatch", f"{_events(seqs)}: keyed with key id {other}, not {own_id}")
        signed = sorted(keyed_seqs + bad_mac + [s for v in foreign.values() for s in v])
        first = signed[0] if signed else None
        late = [s for s in unkeyed if first is None or s > first]
        if late and signed:
            problem("unkeyed", f"{_events(late)}: no HMAC after keyed events (a writer without "
                               f"{KEY_ENV}, or forged)")
        elif late:
            problem("unkeyed", f"no event carries an HMAC: the log was written without {KEY_ENV} "
                               "(or stripped of it), so nothing shows who wrote it")
        early = [s for s in unkeyed if first is not None and s < first]
        if early:
            notes.append(f"{_events(early)}: unkeyed, written before keying began; event {first}'s HMAC "
                         "covers them through the hash chain")
        keyed = not (late or bad_mac or foreign) and (bool(keyed_seqs) or not numbered)

    anchored, anchor_seq, where = False, None, None
    if anchor is not None:
        where = anchor.where
        try:
            record = anchor.get(lake_id(lake))
        except (AnchorInvalid, OSError) as exc:   # OSError: StorageUnavailable, PermissionError
            problem("anchor_invalid", f"audit anchor {where}: {exc}" if isinstance(exc, PermissionError) else str(exc))
            record = None
        if record is None and numbered:
            notes.append(f"the anchor {where} holds no record of this lake yet: the next append makes one")
        elif record is not None:
            anchored, anchor_seq = True, record["seq"]
            s = record["seq"]
            if s > count:
                problem("anchor_ahead", f"the anchor {where} records event {s}, the log holds {count} events: "
                                        "events were cut or deleted")
            if s > 0:
                event = by_path.get(event_path(s))
                if event is None and s <= count:
                    problem("anchor_mismatch", f"event {s}, the last one the anchor records, is missing or "
                                               "unreadable")
                elif event is not None and (event.get("hash") != record["hash"]
                                            or event.get("hmac") != record.get("hmac")):
                    problem("anchor_mismatch", f"event {s} differs from the one the anchor {where} records "
                                               "(history rewritten)")
            later = [seq for seq, _ in numbered if seq > s]
            if later:
                notes.append(f"{_events(later)}: after the last anchored "
                             "event (an append stopped before its checkpoint, or was added since)")
    return ChainReport(events=count, ok=not problems, problems=problems, kinds=kinds, keyed=keyed,
                       anchored=anchored, key_id=own_id, anchor=where, anchor_seq=anchor_seq, notes=notes)


def read_events(lake: Lake) -> list[dict[str, Any]]:
    """Every event, oldest first."""
    return [json.loads(lake.read_text(p)) for p in lake.find(EVENTS) if p.endswith(".json")]
