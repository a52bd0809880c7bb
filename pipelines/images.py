"""Image definitions (``containers/<key>/``) and the lock of their digests (``containers/lock``).

What "digest" means here
------------------------
An image built on this machine and never pushed has no registry manifest digest. What it has
is its **image ID**: the sha256 of its config JSON, which lists every layer by the sha256 of
its uncompressed content (``rootfs.diff_ids``) plus the entrypoint, environment and history.
That is what the lock records as ``digest`` (``podman image inspect --format '{{.Id}}'``,
written ``sha256:<hex>``). Unlike a manifest digest, it does not change when the image is
pushed (a registry re-compresses layers, which changes the manifest, not the config), saved
and loaded into another engine (``podman save | docker load`` keeps it), or re-tagged. The
runner starts images by this ID, so the image that runs is the one that was checked.

The lock is TOML, one ``[images.<key>]`` table per image, written only by
``corelab containers build`` (and ``check-reproducible``, ``export``, ``sif``, which add to the
entry of the same digest). Next to the digest it keeps the sha256 of the Containerfile, of the
hash-pinned requirements lock and of the pipeline's source folders that made the image, so a
definition changed after the build is seen (:func:`definition_drift`).

Optional fields
---------------
``reproducible``
    ``true`` when a rebuild from a clean cache (a podman storage of its own, no layer cache)
    gave the same image ID; ``false`` when it did not, and then ``differs`` lists what differed
    (``corelab containers check-reproducible``). Absent: never checked.
``differs``
    What a clean rebuild changed: config fields and, per layer, which files and how.
``rebuilt_digest``
    The image ID the last clean rebuild gave.
``archive_sha256``
    The sha256 of ``<key>-<id12>.oci.tar`` written by ``corelab containers export`` (``podman
    save --format oci-archive``); ``corelab containers load`` loads only that file.
``sif_sha256``
    The SIF file of ``corelab containers sif``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import tomllib
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
LOCK_PATH = CONTAINERS / "lock"
LOCK_FORMAT = 1
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_OPTIONAL = ("sif_sha256", "archive_sha256", "reproducible", "rebuilt_digest", "differs")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_LOCK_HEADER = """\
# Pinned pipeline images. Written by `corelab containers build`; do not edit by hand.
# digest = the image ID (sha256 of the image config, which names every layer by content);
# see pipelines/images.py. The *_sha256 fields are the definitions that made the image.
"""


class LockError(ValueError):
    """containers/lock or an image definition is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class LockedImage:
    """One image as recorded in ``containers/lock``."""

    key: str
    name: str
    tag: str
    digest: str
    pipeline_version: str
    containerfile_sha256: str
    requirements_sha256: str
    source_sha256: str
    python: str
    base: str
    engine: str
    built_at: str
    sif_sha256: str = ""
    archive_sha256: str = ""
    reproducible: bool | None = None
    rebuilt_digest: str = ""
    differs: tuple[str, ...] = ()

    @property
    def reference(self) -> str:
        """``name@sha256:...``: how specs and provenance name the image."""
        return f"{self.name}@{self.digest}"

    @property
    def tagged(self) -> str:
        return f"{self.name}:{self.tag}"


def definition_dir(key: str, containers: Path = CONTAINERS) -> Path:
    return containers / key


def containerfile_path(key: str, containers: Path = CONTAINERS) -> Path:
    return definition_dir(key, containers) / "Containerfile"


def requirements_path(key: str, containers: Path = CONTAINERS) -> Path:
    return definition_dir(key, containers) / "requirements.lock"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_sha256(folders: tuple[str, ...], repo: Path = REPO) -> str:
    """One hash over the files under ``folders`` (repo-relative), names included.

    Compiled files and caches are skipped; so are files that git ignores by convention
    (``__pycache__``). The hash changes when any file is added, removed, renamed or edited.
    """
    h = hashlib.sha256()
    for folder in sorted(folders):
        root = repo / folder
        if not root.is_dir():
            raise LockError(f"pipeline source folder {folder!r} does not exist in {repo}")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
                continue
            h.update(path.relative_to(repo).as_posix().encode() + b"\0")
            h.update(sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def read_requirements(path: Path) -> dict[str, str]:
    """``name==version`` pins of a requirements lock, names normalized (PEP 503)."""
    if not path.is_file():
        raise LockError(f"requirements lock {path} does not exist")
    pins: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith(("#", "--hash")):
            continue
        match = _PIN.match(text)
        if not match:
            raise LockError(f"{path}:{n}: not an exact pin (name==version): {text!r}")
        pins[normalize(match.group(1))] = match.group(2)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_mismatches(pins: dict[str, str]) -> list[str]:
    """Differences between the running environment and ``pins`` (empty when equal)."""
    out = []
    for name, wanted in sorted(pins.items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(f"{name}: image has {wanted}, not installed here")
            continue
        if have != wanted:
            out.append(f"{name}: image has {wanted}, installed {have}")
    return out


def python_mismatch(image_python: str) -> str | None:
    """A message when this interpreter's major.minor differs from the image's."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if ".".join(image_python.split(".")[:2]) != here:
        return f"python: image has {image_python}, running {sys.version.split()[0]}"
    return None


def read_lock(path: Path = LOCK_PATH) -> dict[str, LockedImage]:
    """All images in the lock, by key; an absent lock is an empty one."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise LockError(f"{path} is not valid TOML: {err}") from err
    if data.get("format") != LOCK_FORMAT:
        raise LockError(f"{path}: format {data.get('format')!r} is not {LOCK_FORMAT}")
    known = {f.name for f in fields(LockedImage)} - {"key"}
    images = {}
    for key, entry in data.get("images", {}).items():
        missing = sorted(f.name for f in fields(LockedImage)
                         if f.name not in ("key", *_OPTIONAL) and f.name not in entry)
        extra = sorted(set(entry) - known)
        if missing or extra:
            raise LockError(f"{path}: image {key!r} has missing fields {missing} / unknown {extra}")
        if not _DIGEST.match(entry["digest"]):
            raise LockError(f"{path}: image {key!r} digest {entry['digest']!r} is not sha256:<64 hex>")
        if "reproducible" in entry and not isinstance(entry["reproducible"], bool):
            raise LockError(f"{path}: image {key!r} reproducible must be true or false")
        if not isinstance(entry.get("differs", []), list):
            raise LockError(f"{path}: image {key!r} differs must be a list of strings")
        entry["differs"] = tuple(str(d) for d in entry.get("differs", ()))
        images[key] = LockedImage(key=key, **entry)
    return images


def locked_image(key: str, path: Path = LOCK_PATH) -> LockedImage:
    images = read_lock(path)
    if key not in images:
        raise LockError(f"image {key!r} is not in {path}: build it with "
                        f"`corelab containers build {key}` (known: {sorted(images)})")
    return images[key]


def write_lock_entry(entry: LockedImage, path: Path = LOCK_PATH) -> None:
    """Add or replace one image in the lock, atomically (temporary file, then rename)."""
    images = read_lock(path)
    images[entry.key] = entry
    lines = [_LOCK_HEADER, f"format = {LOCK_FORMAT}", ""]
    for key in sorted(images):
        lines.append(f"[images.{key}]")
        for name, value in asdict(images[key]).items():
            if name != "key" and value not in ("", None, ()):
                # A JSON string is a valid TOML basic string; a JSON list of them a TOML array,
                # JSON true/false TOML booleans.
                lines.append(f"{name} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")
        lines.append("")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lock.")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)


def definition_drift(entry: LockedImage, sources: tuple[str, ...],
                     containers: Path = CONTAINERS, repo: Path = REPO) -> list[str]:
    """How the current definition differs from the one that built the locked image."""
    out = []
    checks = (("Containerfile", containerfile_path(entry.key, containers), entry.containerfile_sha256),
              ("requirements lock", requirements_path(entry.key, containers), entry.requirements_sha256))
    for what, path, locked in checks:
        if not path.is_file():
            out.append(f"{what} {_shown(path, repo)} is missing")
        elif sha256_file(path) != locked:
            out.append(f"{what} {_shown(path, repo)} changed since image {entry.key!r} was built")
    if sources and source_sha256(sources, repo) != entry.source_sha256:
        out.append(f"pipeline code in {', '.join(sources)} changed since image {entry.key!r} was built")
    return out


def _shown(path: Path, repo: Path) -> str:
    try:
        return path.relative_to(repo).as_posix()
    except ValueError:
        return str(path)
