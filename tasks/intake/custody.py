"""Custody of raw uploads: the inbox, the quarantine and the release of raw copies.

``inbox/<site>/<upload>/`` holds the upload exactly as received (PHI,
restricted) until each file's de-identified copy is verified; only then is the
raw copy released (deleted). ``quarantine/<site>/<upload>/`` holds what could
not be accepted, each file beside a ``<name>.reason.json`` naming the file and
the problem. Nothing is deleted from the inbox that has not been verified in
``deid/``, so a crash at any point loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import TRANSIENT_RETRIES
from tasks.intake.inventory import Inventory, ReceivedFile, upload_paths
from tasks.lake.storage import Lake

REASON_SUFFIX = ".reason.json"


@dataclass(frozen=True)
class QuarantineRecord:
    path: str          # lake path of the quarantined copy
    reason: str        # names the file and the problem
    code: str          # short category, safe for tables and the audit log
    sha256: str
    new: bool = True   # False: the same file was already quarantined for the same reason


def inbox_prefix(site: str, upload: str) -> str:
    return f"inbox/{site}/{upload}"


def stage_inbox(lake: Lake, site: str, upload: str, root: Path) -> list[str]:
    """Copy the upload, as received, into the inbox (idempotent)."""
    root = Path(root)
    # links are not followed (the inventory refuses them): nothing from outside the upload is copied
    files = [p for p in upload_paths(root) if p == root or (p.is_file() and not p.is_symlink())]
    todo: dict[str, bytes] = {}
    for p in files:
        rel = p.name if root.is_file() else p.relative_to(root).as_posix()
        dest = f"{inbox_prefix(site, upload)}/{rel}"
        if not lake.exists(dest):
            todo[dest] = p.read_bytes()
    lake.write_many(todo)
    return [f"{inbox_prefix(site, upload)}/{p.name if root.is_file() else p.relative_to(root).as_posix()}"
            for p in files]


def _safe_name(rel: str) -> str:
    """A path inside the upload's quarantine folder for a file or archive member name.

    A file of a folder upload keeps its path (a file system cannot hold ``..`` or a name twice).
    An archive member (``a.zip!b/c.dcm``) may be named anything: ``..``, an absolute path, a
    drive letter, backslashes (zip traversal), ``x`` beside ``x/y``, a name too long for a file
    system. It becomes one flat name in the archive's folder, made of safe characters, cut to 120
    and ended with a hash of the name as it came, so no two members share one and none leaves its
    upload's folder. The reason file keeps the name as it came.
    """
    if "!" not in rel:
        return rel
    archive, member = rel.split("!", 1)
    flat = re.sub(r"[^A-Za-z0-9._^-]+", "_", member).strip("._") or "member"
    digest = hashlib.sha256(member.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{archive}__/{flat[:120]}-{digest}"


def quarantine(lake: Lake, site: str, upload: str, rel: str, data: bytes, reason: str,
               code: str, sha256: str) -> QuarantineRecord:
    """Put one file (or one archive member) in quarantine with its reason.

    Idempotent: the same file sent again and refused for the same reason is not written again
    (its reason file keeps the first ``quarantined_at``), and the record says it is not new.
    """
    dest = f"quarantine/{site}/{upload}/{_safe_name(rel)}"
    if _already(lake, dest + REASON_SUFFIX, sha256, reason, code):
        return QuarantineRecord(dest, reason, code, sha256, new=False)
    if data:
        lake.write_bytes(dest, data)
    lake.write_text(dest + REASON_SUFFIX, json.dumps({
        "file": rel,
        "sha256": sha256,
        "reason": reason,
        "code": code,
        "site": site,
        "upload": upload,
        "quarantined_at": datetime.now(timezone.utc).isoformat(),
    }, indent=2))
    return QuarantineRecord(dest, reason, code, sha256)


def _already(lake: Lake, reason_path: str, sha256: str, reason: str, code: str) -> bool:
    if not lake.exists(reason_path):
        return False
    try:
        old = json.loads(lake.read_text(reason_path))
    except ValueError:  # a reason file that does not parse is written again
        return False
    return (old.get("sha256"), old.get("reason"), old.get("code")) == (sha256, reason, code)


def release_inbox(lake: Lake, site: str, upload: str, verified: set[str], all_files: list[str]) -> int:
    """Delete the raw copies whose de-identified copies are verified in ``deid/``.

    ``all_files`` names every file of the upload as the inventory saw it
    (archive members as ``a.zip!member``). An archive is released only when
    every one of its members was verified; anything else stays in the inbox.
    """
    members: dict[str, list[str]] = {}
    for rel in all_files:
        members.setdefault(rel.split("!", 1)[0], []).append(rel)
    released = 0
    for stored, names in sorted(members.items()):
        if not all(n in verified for n in names):
            continue
        path = f"{inbox_prefix(site, upload)}/{stored}"
        if lake.exists(path):
            lake.remove(path)
            released += 1
    return released


def take_custody(lake: Lake, site: str, upload_key: str, upload: Path, inv: Inventory) -> list[QuarantineRecord]:
    """Raw copy into the inbox; every file the inventory rejected into quarantine with its reason."""
    stage_inbox(lake, site, upload_key, upload)
    return [quarantine(lake, site, upload_key, r.rel, r.raw, r.reason, r.code, r.sha256)
            for r in inv.rejected]


def quarantine_files(lake: Lake, site: str, upload_key: str, files: list[ReceivedFile], reason: str,
                     code: str) -> list[QuarantineRecord]:
    """Quarantine accepted files after all (a study that cannot be attributed), each with the reason."""
    return [quarantine(lake, site, upload_key, f.rel, f.raw, f"{f.rel}: {reason}", code, f.sha256)
            for f in files]


@task(name="custody", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def take_custody_task(lake: Lake, site: str, upload_key: str, upload: Path, inv: Inventory) -> list[QuarantineRecord]:
    return take_custody(lake, site, upload_key, upload, inv)


@task(name="quarantine-study", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def quarantine_files_task(lake: Lake, site: str, upload_key: str, files: list[ReceivedFile], reason: str,
                          code: str) -> list[QuarantineRecord]:
    return quarantine_files(lake, site, upload_key, files, reason, code)
