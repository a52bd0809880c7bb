"""Build a pipeline image with podman, air-gapped, and record its digest in ``containers/lock``.

Steps of :func:`build_image` (each logs what it runs):

1. the base image: ``containers/build_base.sh`` (debootstrap of Debian bookworm from the apt
   mirror this machine uses, imported into podman) unless another base is given;
2. a wheelhouse on the host: ``pip download --require-hashes`` of the image's requirements
   lock into ``containers/.cache/wheelhouse`` (git-ignored; reused by later builds);
3. a wheel of the pipeline's own code (``spec.sources``), built from a copy of those folders;
4. ``podman build --network none``: the Containerfile installs from the wheelhouse with
   ``--no-index --require-hashes``, so nothing inside the build reaches a network;
5. the image ID (see :mod:`pipelines.images` for why that is the digest), the image's Python
   version, and the hashes of the definitions and pipeline sources go into the lock.

Podman always runs with corelab's ``containers/podman/containers.conf`` (``CONTAINERS_CONF``).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from pipelines.images import (
    CONTAINERS,
    LOCK_PATH,
    REPO,
    LockedImage,
    LockError,
    containerfile_path,
    locked_image,
    normalize,
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
WHEEL_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
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


def podman_env(conf: Path = PODMAN_CONF) -> dict[str, str]:
    """The environment podman runs with: corelab's containers.conf, unless the caller set one."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(conf))
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


def ensure_base(base: str, env: dict[str, str]) -> str:
    """Make sure ``base`` exists locally; build corelab's own base when it is the default."""
    exists = subprocess.run(["podman", "image", "exists", base], env=env).returncode == 0
    if not exists:
        if base != DEFAULT_BASE:
            raise BuildError(f"base image {base!r} is not in podman's storage; pull or load it "
                             "first (builds run with --network none and --pull=never)")
        run_logged(["bash", str(CONTAINERS / "build_base.sh"), base], env=env, step="base image")
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


def build_image(spec: PipelineSpec, *, base: str = DEFAULT_BASE, lock_path: Path = LOCK_PATH,
                no_cache: bool = False) -> LockedImage:
    """Build ``spec.image`` with podman and record it in the lock.

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
    containerfile, requirements = containerfile_path(key), requirements_path(key)
    for path in (containerfile, requirements):
        if not path.is_file():
            raise LockError(f"image {key!r} has no {path.name} in {path.parent}")
    env = podman_env()
    base_id = ensure_base(base, env)
    fill_wheelhouse(requirements)
    context = stage_context(key, spec.sources)
    tag = f"{IMAGE_PREFIX}{key}:{spec.version}"
    argv = ["podman", "build", "--network", "none", "--pull=never", "-f", str(containerfile),
            "--build-arg", f"BASE={base}", "--label", f"org.corelab.pipeline={spec.name}",
            "--label", f"org.corelab.pipeline.version={spec.version}", "-t", tag, str(context)]
    if no_cache:
        argv.insert(2, "--no-cache")
    run_logged(argv, env=env, step="podman build")
    entry = LockedImage(
        key=key, name=tag.rsplit(":", 1)[0], tag=spec.version, digest=image_id(tag, env),
        pipeline_version=spec.version, containerfile_sha256=sha256_file(containerfile),
        requirements_sha256=sha256_file(requirements), source_sha256=source_sha256(spec.sources),
        python=python_in_image(tag, env), base=f"{base.split('@')[0]}@{base_id}",
        engine=run_logged(["podman", "--version"], env=env, step="engine").strip(),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_lock_entry(entry, lock_path)
    log.info("locked %s as %s in %s", key, entry.reference, lock_path)
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
