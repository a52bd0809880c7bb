"""``corelab containers``: build pipeline images, record their digests, check them.

Mounted by ``flows/cli``; also runs alone: ``python -m flows.cli.containers --help``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import typer

from flows.cli.common import fail
from pipelines.image_build import (
    CACHE,
    DEFAULT_BASE,
    BuildError,
    build_image,
    check_reproducible,
    export_archive,
    export_sif,
    load_archive,
    lock_requirements,
    podman_env,
)
from pipelines.images import LOCK_PATH, REPO, LockedImage, LockError, definition_drift, read_lock
from pipelines.registry import UnknownPipeline, spec_for_image

app = typer.Typer(help="Pinned pipeline images: build, lock, verify, check a clean rebuild, export and "
                       "load (`corelab -v containers ...` logs each command before it runs).",
                  no_args_is_help=True)


@app.command()
def build(image: str = typer.Argument("anat", help="Image key: folder containers/<image>/."),
          base: str = typer.Option(DEFAULT_BASE, help="Base image (default: the air-gapped "
                                   "Debian base of containers/build_base.sh)."),
          lock: Path = typer.Option(LOCK_PATH, help="Lock file to record the digest in."),
          cache: bool = typer.Option(False, "--cache/--no-cache",
                                     help="Reuse podman's layer cache (faster, for trying a change). The "
                                          "default rebuilds every layer: a cached layer made by another "
                                          "build leaves that build's IDs in the image history, and the "
                                          "locked digest then differs from a clean rebuild's (found on "
                                          "the dwi and bold images).")) -> None:
    """Build IMAGE with podman (--network none) and record its digest in the lock."""
    no_cache = not cache
    try:
        entry = build_image(spec_for_image(image), base=base, lock_path=lock, no_cache=no_cache)
    except (BuildError, LockError, UnknownPipeline) as err:
        fail(str(err))
    typer.echo(f"{image}: {entry.reference} (pipeline {entry.pipeline_version}) -> {lock}")


@app.command("lock-requirements")
def lock_requirements_cmd(image: str = typer.Argument("anat")) -> None:
    """Re-pin containers/IMAGE/requirements.lock (hashes) from requirements.in."""
    try:
        path = lock_requirements(image)
    except (BuildError, LockError) as err:
        fail(str(err))
    typer.echo(f"wrote {path}; rebuild the image: corelab containers build {image}")


@app.command()
def sif(image: str = typer.Argument("anat"), lock: Path = typer.Option(LOCK_PATH)) -> None:
    """Convert the locked IMAGE to an apptainer SIF and record its sha256 in the lock."""
    try:
        path = export_sif(image, lock)
    except (BuildError, LockError) as err:
        fail(str(err))
    typer.echo(f"{image}: {path} recorded in {lock}")


@app.command("check-reproducible")
def check_reproducible_cmd(image: str = typer.Argument("anat"), lock: Path = typer.Option(LOCK_PATH),
                           fresh_base: bool = typer.Option(False, help="Also run debootstrap again "
                                                           "(as another machine would) instead of "
                                                           "reusing the cached rootfs tarball."),
                           record: bool = typer.Option(True, help="Write the outcome into the lock.")) -> None:
    """Rebuild IMAGE from a clean cache (an empty podman store) and compare with the locked digest.

    Records reproducible = true/false (and what differed) in the lock. Exits 1 when it differs.
    """
    try:
        result = check_reproducible(spec_for_image(image), lock, fresh_base=fresh_base, record=record)
    except (BuildError, LockError, UnknownPipeline) as err:
        fail(str(err))
    typer.echo(f"{image}: locked {result.locked}, clean rebuild {result.rebuilt} "
               f"({result.seconds:.0f} s): " + ("reproducible" if result.reproducible else
                                                  "NOT reproducible"))
    for line in result.differs:
        typer.echo(f"  differs: {line}")
    if not result.reproducible:
        raise typer.Exit(1)


@app.command()
def export(image: str = typer.Argument("anat"), out: Path = typer.Option(CACHE, help="Folder for the "
                                                                         "<image>-<id12>.oci.tar file."),
           lock: Path = typer.Option(LOCK_PATH)) -> None:
    """Save the locked IMAGE as an OCI archive (podman save) and record its sha256 in the lock."""
    try:
        path = export_archive(image, lock, out)
    except (BuildError, LockError) as err:
        fail(str(err))
    typer.echo(f"{image}: {path} recorded in {lock}")


@app.command()
def load(archive: Path = typer.Argument(..., help="An archive written by `corelab containers export`."),
         lock: Path = typer.Option(LOCK_PATH)) -> None:
    """Load ARCHIVE into podman only if the lock records its sha256 and it is the locked image."""
    try:
        entry = load_archive(archive, lock)
    except (BuildError, LockError) as err:
        fail(str(err), code=1)
    typer.echo(f"{entry.key}: loaded {entry.tagged} = {entry.digest}")


@app.command("list")
def list_images(lock: Path = typer.Option(LOCK_PATH)) -> None:
    """The locked images: key, reference, pipeline version, build time."""
    try:
        images = read_lock(lock)
    except LockError as err:
        fail(str(err))
    if not images:
        typer.echo(f"no images in {lock}")
    for key, entry in sorted(images.items()):
        typer.echo(f"{key}\t{entry.reference}\t{entry.pipeline_version}\t{entry.built_at}")


@app.command()
def verify(image: list[str] = typer.Argument(None, help="Image keys (default: all locked)."),
           repo: Path = typer.Option(REPO, help="Repository whose containers/ and lock to check."),
           engine: bool = typer.Option(True, help="Also ask podman for the image's digest.")) -> None:
    """Check that each locked image matches its definition (and podman's copy of it).

    Exits 1 when a definition or the pipeline's code changed since the build, or when
    podman's image differs from the locked digest. An image whose clean rebuild gave another
    digest (``check-reproducible``) is said so on its line.
    """
    try:
        images = read_lock(repo / "containers" / "lock")
        keys = image or sorted(images)
        problems = {key: _problems(key, images, engine, repo) for key in keys}
    except (LockError, UnknownPipeline) as err:
        fail(str(err))
    for key, found in problems.items():
        note = _reproducibility(images[key]) if key in images else ""
        typer.echo(f"{key}: " + ("ok" if not found else "; ".join(found)) + note)
    if any(problems.values()):
        raise typer.Exit(1)


def _reproducibility(entry: LockedImage) -> str:
    if entry.reproducible is None:
        return ""
    if entry.reproducible:
        return " (reproducible: a clean rebuild gave the same digest)"
    return (f"; NOT reproducible: a clean rebuild gave {entry.rebuilt_digest or 'another digest'}, "
            f"differing in: {' | '.join(entry.differs) or 'unknown'}")


def _problems(key: str, images: dict, engine: bool, repo: Path) -> list[str]:
    if key not in images:
        return [f"not in the lock: corelab containers build {key}"]
    entry = images[key]
    spec = spec_for_image(key)
    found = definition_drift(entry, spec.sources, repo / "containers", repo)
    if spec.version != entry.pipeline_version:
        found.append(f"built for {spec.name} {entry.pipeline_version}, the spec is {spec.version}")
    if engine and shutil.which("podman") is None:
        found.append("podman is not installed (check with --no-engine, or containers/setup_podman.sh)")
    elif engine:
        proc = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", entry.tagged],
                              capture_output=True, text=True, env=podman_env())
        actual = "sha256:" + proc.stdout.strip().removeprefix("sha256:") if proc.returncode == 0 else None
        if actual is None:
            found.append(f"podman has no {entry.tagged}")
        elif actual != entry.digest:
            found.append(f"podman's {entry.tagged} is {actual}, the lock pins {entry.digest}")
    return found


if __name__ == "__main__":  # alone, without the corelab CLI's console: log each command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app()
