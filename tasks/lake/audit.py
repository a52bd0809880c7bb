"""Append-only, hash-chained audit log of every step.

Each event is one JSON object under ``audit/events/<seq>.json`` holding the
hash of the event before it; ``audit/head.json`` names the last event. One
object per event (rather than one growing file) because object stores cannot
append, and a write never rewrites history. Changing, removing or reordering
any event breaks the chain, which :func:`verify_chain` reports by sequence
number.

Audit events must never carry PHI: callers pass study keys, lake paths of
de-identified data and sha256 digests, never original names, IDs or UIDs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tasks.lake.storage import Lake

HEAD = "audit/head.json"
GENESIS = "0" * 64


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def event_path(seq: int) -> str:
    return f"audit/events/{seq:012d}.json"


def append_event(lake: Lake, action: str, actor: str = "corelab", **details: Any) -> dict[str, Any]:
    """Append one event; returns it with its ``seq`` and ``hash``."""
    with lake.lock("audit"):
        head = json.loads(lake.read_text(HEAD)) if lake.exists(HEAD) else {"seq": 0, "hash": GENESIS}
        body = {
            "seq": head["seq"] + 1,
            "at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "details": details,
            "prev_hash": head["hash"],
        }
        event = dict(body, hash=hashlib.sha256(_canonical(body)).hexdigest())
        lake.write_bytes(event_path(event["seq"]), _canonical(event))
        lake.write_bytes(HEAD, _canonical({"seq": event["seq"], "hash": event["hash"]}))
    return event


@dataclass
class ChainReport:
    events: int
    ok: bool
    problems: list[str]


def verify_chain(lake: Lake) -> ChainReport:
    """Recompute every hash and link; list every break by sequence number."""
    files = [p for p in lake.find("audit/events") if p.endswith(".json")]
    problems: list[str] = []
    prev = GENESIS
    for expected_seq, rel in enumerate(files, start=1):
        try:
            event = json.loads(lake.read_text(rel))
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"{rel}: not valid JSON ({exc})")
            prev = None
            continue
        seq = event.get("seq")
        if seq != expected_seq or rel != event_path(expected_seq):
            problems.append(f"{rel}: sequence {seq} where {expected_seq} was expected (event missing?)")
        claimed = event.pop("hash", None)
        if hashlib.sha256(_canonical(event)).hexdigest() != claimed:
            problems.append(f"event {seq}: content does not match its hash (edited)")
        if prev is not None and event.get("prev_hash") != prev:
            problems.append(f"event {seq}: prev_hash does not match event {expected_seq - 1}")
        prev = claimed
    if lake.exists(HEAD):
        head = json.loads(lake.read_text(HEAD))
        if files and (head.get("seq") != len(files) or head.get("hash") != prev):
            problems.append(f"head names event {head.get('seq')} but the log ends at {len(files)}")
    elif files:
        problems.append("audit/head.json is missing")
    return ChainReport(events=len(files), ok=not problems, problems=problems)


def read_events(lake: Lake) -> list[dict[str, Any]]:
    """Every event, oldest first."""
    return [json.loads(lake.read_text(p)) for p in lake.find("audit/events") if p.endswith(".json")]
