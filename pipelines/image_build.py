"""Build a pipeline image with podman, air-gapped, and record its digest in ``containers/lock``.

Steps of :func:`build_image` (each logs what it runs):

1. the base image: ``containers/build_base.sh`` (debootstrap of Debian bookworm from the apt
   mirror this machine uses, imported into podman) unless another base is given;
2. a wheelhouse on the host: ``pip download --require-hashes`` of the image's requirements
   lock into ``containers/.cache/wheelhouse`` (git-ignored; reused by later builds);
3. a wheel of the pipeline's own code (``spec.sources``), built from a copy of those folders;
4. ``podman build --network none --timestamp N``: the Containerfile installs from the wheelhouse
   with ``--no-index --require-hashes``, so nothing inside the build reaches a network;
5. the image ID (see :mod:`pipelines.images` for why that is the digest), the image's Python
   version, and the hashes of the definitions and pipeline sources go into the lock.

Reproducible builds
-------------------
Two builds from a clean cache used to differ (measured on podman 4.3.1): the image config's
``created`` and every history entry's ``created`` (the build's clock), the mtimes of every file a
``COPY``/``RUN`` layer adds (17,483 files in the pip layer), and the content of every ``.pyc``
pip wrote (6,074 files: a timestamp-based ``.pyc`` holds its source's mtime, i.e. the install
time). The debootstrap rootfs tarball was already byte-identical run to run. Fixed by
``--timestamp SOURCE_DATE_EPOCH`` (created times and layer mtimes), ``SOURCE_DATE_EPOCH`` in the
pip steps (hash-based ``.pyc``), ``PYTHONHASHSEED=0`` (set constants in a fixed order), the base
committed by ``podman build --timestamp`` rather than ``podman import``, and corelab's own
wheel built with a pinned setuptools and normalized file modes. :func:`check_reproducible`
rebuilds into a podman storage of its own, without any cache, and records in the lock whether
the image ID came out the same, and if not :func:`image_differences` of the two images.

Export
------
:func:`export_archive` writes ``podman save --format oci-archive`` of the locked image and records
its sha256 in the lock; :func:`load_archive` loads only an archive with that sha256, and only
keeps an image whose ID is the locked digest.

Podman always runs with corelab's ``containers/podman/containers.conf`` (``CONTAINERS_CONF``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from pipelines.images import (
    CONTAINERS,
    LOCK_PATH,
    REPO,
    LockedImage,
    LockError,
    containerfile_path,
    definition_drift,
    locked_image,
    normalize,
    read_lock,
    read_requirements,
    requirements_path,
    sha256_file,
    source_sha256,
    write_lock_entry,
)
from pipelines.spec import PipelineSpec

log = logging.getLogger("corelab.containers")
CACHE = CONTAINERS / ".cache"
WHEELHOUSE = CACHE / "wheelhouse"
DEFAULT_BASE = "localhost/corelab-base:bookworm"
PODMAN_CONF = CONTAINERS / "podman" / "containers.conf"
IMAGE_PREFIX = "localhost/corelab-"
WHEEL_EPOCH = 315532800  # 1980-01-01, the earliest time a zip file can hold
# The image's created time and every file mtime in its layers (podman build --timestamp), and
# SOURCE_DATE_EPOCH inside the build: 2025-01-01T00:00:00Z, as EPOCH in containers/build_base.sh.
SOURCE_DATE_EPOCH = 1735689600
# The build backend of corelab's own wheel, pinned: its version is written into the wheel
# (WHEEL, METADATA) and so into the image; "the newest setuptools" would change the digest.
SETUPTOOLS = "84.2.1"
WHEEL_PYPROJECT = """\
[build-system]
requires = ["setuptools==""" + SETUPTOOLS + """"]
build-backend = "setuptools.build_meta"

[project]
name = "corelab-imaging"
version = "{version}"
description = "corelab pipeline code, as installed in a pinned image"
requires-python = ">=3.11,<3.12"

[tool.setuptools.packages.find]
include = [{include}]
"""


class BuildError(RuntimeError):
    """An image could not be built; the message names the failing step and its output."""


def podman_env(conf: Path = PODMAN_CONF, storage_conf: Path | None = None) -> dict[str, str]:
    """The environment podman runs with: corelab's containers.conf, unless the caller set one.

    ``storage_conf``: a storage.conf of its own (``CONTAINERS_STORAGE_CONF``), e.g. the empty,
    throw-away image store of a clean rebuild.
    """
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(conf))
    if storage_conf is not None:
        env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)
    return env


def run_logged(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
               step: str) -> str:
    """Run a build step, logging the exact command first; its stdout, or BuildError."""
    log.info("%s: %s", step, shlex.join(argv))
    try:
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise BuildError(f"{step}: {argv[0]} is not installed (containers/setup_podman.sh)") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise BuildError(f"{step} failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}")
    return proc.stdout


def ensure_base(base: str, env: dict[str, str], base_cache: Path | None = None) -> str:
    """Make sure ``base`` exists locally; build corelab's own base when it is the default.

    ``base_cache``: where build_base.sh keeps (or makes, by debootstrap) the rootfs tarball;
    default ``containers/.cache``.
    """
    exists = subprocess.run(["podman", "image", "exists", base], env=env).returncode == 0
    if not exists:
        if base != DEFAULT_BASE:
            raise BuildError(f"base image {base!r} is not in podman's storage; pull or load it "
                             "first (builds run with --network none and --pull=never)")
        base_env = dict(env, CORELAB_BASE_CACHE=str(base_cache)) if base_cache else env
        run_logged(["bash", str(CONTAINERS / "build_base.sh"), base], env=base_env, step="base image")
    return image_id(base, env)


def image_id(ref: str, env: dict[str, str]) -> str:
    out = run_logged(["podman", "image", "inspect", "--format", "{{.Id}}", ref], env=env,
                     step="inspect")
    return "sha256:" + out.strip().removeprefix("sha256:")


def check_host_python() -> None:
    """Wheels are fetched for the host; that is only right when the host matches the image."""
    if sys.version_info[:2] != (3, 11) or sys.platform != "linux" or os.uname().machine != "x86_64":
        raise BuildError("the wheelhouse is downloaded for the running interpreter, which must be "
                         "CPython 3.11 on linux x86_64 like the image (Debian bookworm's python3)")


def fill_wheelhouse(requirements: Path, wheelhouse: Path = WHEELHOUSE) -> None:
    """Download every pinned wheel, hash-checked, into the (cached) wheelhouse."""
    check_host_python()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    run_logged([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--only-binary=:all:", "--require-hashes", "-r", str(requirements),
                "-d", str(wheelhouse)], step="wheelhouse")


def corelab_wheel(out_dir: Path, sources: tuple[str, ...], repo: Path = REPO) -> Path:
    """A wheel of the pipeline's code only: its source folders and their parent packages.

    Built from a copy (the work tree stays clean). Only ``sources`` go in, so the image's
    code is exactly what ``source_sha256`` in the lock hashes, and edits elsewhere in the
    repository (flows, tasks) neither change the image nor its digest.
    """
    if not sources:
        raise BuildError("the pipeline spec lists no source folders to put in its image")
    version = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    tops = sorted({Path(folder).parts[0] for folder in sources})
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="src-") as tmp:
        src = Path(tmp)
        # A minimal project of its own: the repository's pyproject (dependencies, readme) is
        # not the image's business; its dependencies come from the requirements lock.
        (src / "pyproject.toml").write_text(WHEEL_PYPROJECT.format(
            version=version, include=", ".join(f'"{top}*"' for top in tops)))
        for folder in sources:
            shutil.copytree(repo / folder, src / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            for parent in Path(folder).parents:
                if parent != Path(".") and (repo / parent / "__init__.py").is_file():
                    shutil.copy2(repo / parent / "__init__.py", src / parent / "__init__.py")
        # The zip records each file's mode; a checkout's modes follow its umask.
        for path in src.rglob("*"):
            if path.is_file():
                path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Fixed zip timestamps: the same sources give the same wheel bytes, so podman's layer
        # cache is hit and a rebuild of an unchanged tree keeps the locked digest.
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(WHEEL_EPOCH))
        run_logged([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "-w", str(out_dir), str(src)], env=env, step="corelab wheel")
    wheels = sorted(out_dir.glob("corelab_imaging-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one corelab wheel in {out_dir}, found {len(wheels)}")
    return wheels[0]


def stage_context(key: str, sources: tuple[str, ...], wheelhouse: Path = WHEELHOUSE) -> Path:
    """The build context: requirements lock, the wheels it pins, and corelab's wheel."""
    context = CACHE / "build" / key
    shutil.rmtree(context, ignore_errors=True)
    (context / "wheels").mkdir(parents=True)
    requirements = requirements_path(key)
    shutil.copy2(requirements, context / "requirements.lock")
    pins = read_requirements(requirements)
    for wheel in wheelhouse.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if pins.get(normalize(name)) == version:
            os.link(wheel, context / "wheels" / wheel.name)
    corelab_wheel(context / "corelab", sources)
    return context


def python_in_image(ref: str, env: dict[str, str]) -> str:
    out = run_logged(["podman", "run", "--rm", "--network", "none", ref, "python", "-c",
                      "import platform; print(platform.python_version())"],
                     env=env, step="image python")
    return out.strip()


def podman_build(spec: PipelineSpec, *, base: str = DEFAULT_BASE, no_cache: bool = False,
                 env: dict[str, str] | None = None, base_cache: Path | None = None) -> tuple[str, str]:
    """Run the build of ``spec.image`` (base, wheelhouse, context, ``podman build``).

    Returns
    -------
    tuple of str
        The tag built and the base image's ID.
    """
    key = spec.image
    containerfile, requirements = containerfile_path(key), requirements_path(key)
    for path in (containerfile, requirements):
        if not path.is_file():
            raise LockError(f"image {key!r} has no {path.name} in {path.parent}")
    env = env or podman_env()
    base_id = ensure_base(base, env, base_cache)
    fill_wheelhouse(requirements)
    context = stage_context(key, spec.sources)
    tag = f"{IMAGE_PREFIX}{key}:{spec.version}"
    argv = ["podman", "build", "--network", "none", "--pull=never", "-f", str(containerfile),
            "--timestamp", str(SOURCE_DATE_EPOCH),
            "--build-arg", f"SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH}",
            "--build-arg", f"BASE={base}", "--label", f"org.corelab.pipeline={spec.name}",
            "--label", f"org.corelab.pipeline.version={spec.version}", "-t", tag, str(context)]
    if no_cache:
        argv.insert(2, "--no-cache")
    run_logged(argv, env=env, step="podman build")
    return tag, base_id


def build_image(spec: PipelineSpec, *, base: str = DEFAULT_BASE, lock_path: Path = LOCK_PATH,
                no_cache: bool = False) -> LockedImage:
    """Build ``spec.image`` with podman and record it in the lock.

    What the lock said about the same image ID (a reproducibility check, an exported archive, a
    SIF) is kept; a new image ID starts a fresh entry.

    Returns
    -------
    LockedImage
        The entry written to ``lock_path``.

    Raises
    ------
    BuildError
        A step failed; the message names it, with the command and its output.
    """
    key = spec.image
    env = podman_env()
    tag, base_id = podman_build(spec, base=base, no_cache=no_cache, env=env)
    entry = LockedImage(
        key=key, name=tag.rsplit(":", 1)[0], tag=spec.version, digest=image_id(tag, env),
        pipeline_version=spec.version, containerfile_sha256=sha256_file(containerfile_path(key)),
        requirements_sha256=sha256_file(requirements_path(key)), source_sha256=source_sha256(spec.sources),
        python=python_in_image(tag, env), base=f"{base.split('@')[0]}@{base_id}",
        engine=run_logged(["podman", "--version"], env=env, step="engine").strip(),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    previous = read_lock(lock_path).get(key)
    if previous is not None and previous.digest == entry.digest:
        entry = replace(entry, sif_sha256=previous.sif_sha256, archive_sha256=previous.archive_sha256,
                        reproducible=previous.reproducible, rebuilt_digest=previous.rebuilt_digest,
                        differs=previous.differs)
    write_lock_entry(entry, lock_path)
    log.info("locked %s as %s in %s", key, entry.reference, lock_path)
    return entry


# --- reproducibility ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reproduction:
    """The outcome of a clean rebuild: the locked and the rebuilt image ID, what differed."""

    key: str
    locked: str
    rebuilt: str
    differs: tuple[str, ...]
    seconds: float

    @property
    def reproducible(self) -> bool:
        return self.locked == self.rebuilt


def storage_conf(root: Path) -> Path:
    """A storage.conf for an empty image store under ``root`` (overlay, like the default)."""
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\n'
                    f'runroot = "{root / "run"}"\n')
    return conf


def check_reproducible(spec: PipelineSpec, lock_path: Path = LOCK_PATH, *, fresh_base: bool = False,
                       record: bool = True) -> Reproduction:
    """Rebuild the locked image from a clean cache and compare image IDs.

    The rebuild runs in a podman image store of its own (an empty storage under
    ``containers/.cache``, removed afterwards), so no layer, base image or build cache of the
    machine's storage takes part and the locked image stays as it is. The pinned wheels come from
    the hash-checked wheelhouse (the same bytes wherever they are downloaded); the base rootfs
    is the cached debootstrap tarball, or with ``fresh_base`` a new debootstrap run.

    When the IDs differ and podman's store holds the locked image, both are saved as OCI layouts
    and compared (:func:`image_differences`). With ``record`` the lock entry gets
    ``reproducible``, ``rebuilt_digest`` and ``differs``.

    Raises
    ------
    BuildError
        The definition changed since the build (rebuilding it would test something else), the
        base is not corelab's own, or a step failed.
    """
    entry = locked_image(spec.image, lock_path)
    drift = definition_drift(entry, spec.sources)
    if drift:
        raise BuildError(f"{spec.image}: {'; '.join(drift)}: rebuild and lock it first "
                         f"(corelab containers build {spec.image})")
    base = entry.base.split("@")[0]
    if base != DEFAULT_BASE:
        raise BuildError(f"{spec.image} was built on {base}; a clean rebuild is checked for "
                         f"corelab's own base {DEFAULT_BASE} only")
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rebuild-") as tmp:
        root = Path(tmp)
        env = podman_env(storage_conf=storage_conf(root))
        try:
            tag, _ = podman_build(spec, base=base, no_cache=True, env=env,
                                  base_cache=root / "base" if fresh_base else None)
            rebuilt = image_id(tag, env)
            seconds = time.monotonic() - started
            differs: tuple[str, ...] = ()
            if rebuilt != entry.digest:
                differs = tuple(_compare_with_locked(entry, tag, env, root))
        finally:
            subprocess.run(["podman", "rmi", "--all", "--force"], env=env, capture_output=True)
    result = Reproduction(spec.image, entry.digest, rebuilt, differs, seconds)
    log.info("%s: locked %s, clean rebuild %s (%.0f s)", spec.image, entry.digest, rebuilt, seconds)
    if record:
        current = locked_image(spec.image, lock_path)
        write_lock_entry(replace(current, reproducible=result.reproducible, rebuilt_digest=rebuilt,
                                 differs=differs), lock_path)
    return result


def _compare_with_locked(entry: LockedImage, tag: str, env: dict[str, str], root: Path) -> list[str]:
    main = podman_env()
    if subprocess.run(["podman", "image", "exists", entry.digest.removeprefix("sha256:")],
                      env=main).returncode != 0:
        return [f"image ID (podman's store has no locked {entry.digest} to compare layer by layer)"]
    locked_dir, rebuilt_dir = root / "locked.oci", root / "rebuilt.oci"
    run_logged(["podman", "save", "--format", "oci-dir", "-o", str(locked_dir),
                entry.digest.removeprefix("sha256:")], env=main, step="save locked")
    run_logged(["podman", "save", "--format", "oci-dir", "-o", str(rebuilt_dir), tag], env=env,
               step="save rebuilt")
    return image_differences(locked_dir, rebuilt_dir) or ["image ID (same config and layers?)"]


def _oci_image(layout: Path) -> tuple[dict, dict]:
    def blob(digest: str) -> Path:
        algo, hexdigest = digest.split(":", 1)
        return layout / "blobs" / algo / hexdigest

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    manifest["layer_paths"] = [blob(layer["digest"]) for layer in manifest["layers"]]
    return manifest, config


_MEMBER_FIELDS = ("content", "mtime", "mode", "owner", "type", "link", "xattrs")


def _members(layer: Path) -> dict[str, tuple]:
    out = {}
    with tarfile.open(layer) as tf:  # plain or gzip
        for ti in tf:
            content = ""
            if ti.isfile():
                content = hashlib.sha256(tf.extractfile(ti).read()).hexdigest()
            xattrs = tuple(sorted((k, v) for k, v in ti.pax_headers.items() if "xattr" in k))
            out[ti.name] = (content, ti.mtime, ti.mode, (ti.uid, ti.gid), ti.type, ti.linkname, xattrs)
    return out


def image_differences(a: Path, b: Path, examples: int = 2) -> list[str]:
    """What differs between two images saved as OCI layouts (``podman save --format oci-dir``).

    One line per differing config field (``history`` summarized), then one per differing layer:
    the step that made it (from the history), files only in one image, and for files in both
    how many differ in content, mtime, mode, owner, type, link target or xattrs, with examples.
    """
    (ma, ca), (mb, cb) = _oci_image(a), _oci_image(b)
    out = []
    for field in sorted((set(ca) | set(cb)) - {"rootfs", "history"}):
        if ca.get(field) != cb.get(field):
            out.append(f"config {field}: {json.dumps(ca.get(field))[:80]} vs {json.dumps(cb.get(field))[:80]}")
    ha, hb = ca.get("history", []), cb.get("history", [])
    if len(ha) != len(hb):
        out.append(f"config history: {len(ha)} vs {len(hb)} steps")
    else:
        changed = sorted({k for x, y in zip(ha, hb) for k in set(x) | set(y) if x.get(k) != y.get(k)})
        if changed:
            out.append(f"config history: {', '.join(changed)} differ")
    steps = [h.get("created_by", "?") for h in ha if not h.get("empty_layer")]
    ids_a, ids_b = ca["rootfs"]["diff_ids"], cb["rootfs"]["diff_ids"]
    if len(ids_a) != len(ids_b):
        return out + [f"layers: {len(ids_a)} vs {len(ids_b)}"]
    for n, (da, db) in enumerate(zip(ids_a, ids_b)):
        if da == db:
            continue
        step = " ".join(steps[n].replace("/bin/sh -c ", "").replace("#(nop) ", "").split())[:60] \
            if n < len(steps) else "?"
        files_a, files_b = _members(ma["layer_paths"][n]), _members(mb["layer_paths"][n])
        parts = []
        for label, only in (("only in the first", set(files_a) - set(files_b)),
                            ("only in the second", set(files_b) - set(files_a))):
            if only:
                parts.append(f"{len(only)} files {label} (e.g. {', '.join(sorted(only)[:examples])})")
        for i, what in enumerate(_MEMBER_FIELDS):
            names = sorted(p for p in set(files_a) & set(files_b) if files_a[p][i] != files_b[p][i])
            if names:
                parts.append(f"{len(names)} files' {what} (e.g. {', '.join(names[:examples])})")
        if not parts and list(files_a) != list(files_b):
            parts.append("the order of the files in the tar")
        out.append(f"layer {n} [{step}]: " + ("; ".join(parts) or "tar headers only"))
    return out


# --- export and load ------------------------------------------------------------------------------

class ArchiveRefused(BuildError):
    """An image archive is not the one the lock records, or did not load as the locked image."""


def archive_name(entry: LockedImage) -> str:
    return f"{entry.key}-{entry.digest.removeprefix('sha256:')[:12]}.oci.tar"


def export_archive(key: str, lock_path: Path = LOCK_PATH, out_dir: Path = CACHE) -> Path:
    """Save the locked image as an OCI archive and record the archive's sha256 in the lock.

    ``podman save --format oci-archive`` of the image tagged ``name:tag`` (the archive names it,
    so ``podman load`` tags it again), after checking that this tag is the locked image ID.
    podman writes the same blobs each time but stamps the archive's own entries with the time
    of the save; they are rewritten with mtime ``SOURCE_DATE_EPOCH``, so the same image gives
    the same archive bytes on every export. Written to ``out_dir/<key>-<id12>.oci.tar``.
    """
    entry = locked_image(key, lock_path)
    env = podman_env()
    if image_id(entry.tagged, env) != entry.digest:
        raise BuildError(f"podman's {entry.tagged} is not the locked {entry.digest}; rebuild or load it first")
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / archive_name(entry)
    saved, tmp = archive.with_name(archive.name + ".saved"), archive.with_name(archive.name + ".part")
    try:
        saved.unlink(missing_ok=True)
        run_logged(["podman", "save", "--format", "oci-archive", "-o", str(saved), entry.tagged],
                   env=env, step="podman save")
        _normalize_tar(saved, tmp)
        os.replace(tmp, archive)
    finally:
        saved.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    write_lock_entry(replace(entry, archive_sha256=sha256_file(archive)), lock_path)
    return archive


def _normalize_tar(src: Path, dst: Path) -> None:
    """Copy a tar with every entry's mtime set to SOURCE_DATE_EPOCH and owners numeric root."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.GNU_FORMAT) as tout:
        for member in tin:
            member.mtime = SOURCE_DATE_EPOCH
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            member.pax_headers = {}
            tout.addfile(member, tin.extractfile(member) if member.isfile() else None)


def load_archive(archive: Path, lock_path: Path = LOCK_PATH,
                 env: dict[str, str] | None = None) -> LockedImage:
    """Load an exported image archive, only if the lock records it, only as the locked image.

    The archive's sha256 must equal some entry's ``archive_sha256``; after ``podman load`` the
    loaded image's ID must equal that entry's digest, and it is tagged ``name:tag``. Otherwise
    nothing is loaded (a wrong sha256) or the loaded tag is removed again (a wrong ID).

    Raises
    ------
    ArchiveRefused
        The archive is not the locked one, or did not load as the locked image.
    """
    if not archive.is_file():
        raise ArchiveRefused(f"{archive}: no such file")
    actual = sha256_file(archive)
    images = read_lock(lock_path)
    matching = [e for e in images.values() if e.archive_sha256 == actual]
    if not matching:
        recorded = ", ".join(f"{k}: {e.archive_sha256[:12] or 'none'}" for k, e in sorted(images.items()))
        raise ArchiveRefused(f"{archive}: sha256 {actual} is not an archive {lock_path} records "
                             f"({recorded or 'no images'}); refusing to load it")
    entry = matching[0]
    env = env or podman_env()
    out = run_logged(["podman", "load", "--quiet", "-i", str(archive)], env=env, step="podman load")
    loaded = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Loaded image")]
    refs = [ref for line in loaded for ref in line.split(",") if ref.strip()]
    if not refs:
        raise ArchiveRefused(f"{archive}: podman load named no image ({out.strip()[:200]})")
    ids = {image_id(ref.strip(), env) for ref in refs}
    if ids != {entry.digest}:
        for ref in refs:
            subprocess.run(["podman", "untag", ref.strip()], env=env, capture_output=True)
        raise ArchiveRefused(f"{archive} loaded as {', '.join(sorted(ids))}, not the locked "
                             f"{entry.digest} of {entry.key}; refused (its tags removed)")
    run_logged(["podman", "tag", entry.digest.removeprefix("sha256:"), entry.tagged], env=env,
               step="podman tag")
    return entry


def lock_requirements(key: str, constraints: Path = REPO / "requirements.lock",
                      wheelhouse: Path = WHEELHOUSE) -> Path:
    """Write ``containers/<key>/requirements.lock`` from ``requirements.in``, hash-pinned.

    Resolves the top-level names of ``requirements.in`` with the repository's own pins as
    constraints, so every version in the image equals the one ``make setup`` installs (which
    is what lets the ``local`` backend run in the repository's environment). Needs the package
    index; run it when the image's dependencies change, then rebuild the image.
    """
    check_host_python()
    source = requirements_path(key).with_suffix(".in")
    if not source.is_file():
        raise LockError(f"image {key!r} has no {source.name} listing its top-level packages")
    pinned = read_requirements(constraints)
    wheelhouse.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="resolve-") as tmp:
        run_logged([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--only-binary=:all:", "-r", str(source), "-c", str(constraints), "-d", tmp],
                   step="resolve")
        lines = [f"# Hash-pinned Python packages of the {key!r} image; made by "
                 f"`corelab containers lock-requirements {key}`",
                 f"# from {source.name} with the versions of the repository's requirements.lock.", ""]
        for wheel in sorted(Path(tmp).glob("*.whl"), key=lambda p: normalize(p.name.split("-")[0])):
            name, version = normalize(wheel.name.split("-")[0]), wheel.name.split("-")[1]
            if pinned.get(name) != version:
                raise LockError(f"{name} {version} is needed by image {key!r} but "
                                f"{constraints.name} pins {pinned.get(name, 'nothing')}")
            lines += [f"{name}=={version} \\", f"    --hash=sha256:{sha256_file(wheel)}"]
            shutil.copy2(wheel, wheelhouse / wheel.name)
    out = requirements_path(key)
    out.write_text("\n".join(lines) + "\n")
    return out


def export_sif(key: str, lock_path: Path = LOCK_PATH, sif_dir: Path = CACHE / "sif") -> Path:
    """Convert the locked image to an apptainer SIF and record the SIF's sha256 in the lock.

    The image is saved from podman by its locked ID (``podman save --format docker-archive``)
    and built into ``sif_dir/<key>-<id12>.sif`` by ``apptainer build``; the apptainer backend
    later runs that file only while its sha256 equals the recorded one.
    """
    entry = locked_image(key, lock_path)
    env = podman_env()
    if image_id(entry.tagged, env) != entry.digest:
        raise BuildError(f"podman's {entry.tagged} is not the locked {entry.digest}; rebuild first")
    sif_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{key}-{entry.digest.removeprefix('sha256:')[:12]}"
    archive, sif = sif_dir / f"{stem}.tar", sif_dir / f"{stem}.sif"
    try:
        run_logged(["podman", "save", "--format", "docker-archive", "-o", str(archive),
                    entry.digest.removeprefix("sha256:")], env=env, step="podman save")
        run_logged(["apptainer", "build", "--force", str(sif), f"docker-archive://{archive}"],
                   step="apptainer build")
    finally:
        archive.unlink(missing_ok=True)
    write_lock_entry(replace(entry, sif_sha256=sha256_file(sif)), lock_path)
    return sif
