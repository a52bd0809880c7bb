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
from pipelines.image_build import DEFAULT_BASE, BuildError, build_image, export_sif, lock_requirements, podman_env
from pipelines.images import LOCK_PATH, REPO, LockError, definition_drift, read_lock
from pipelines.registry import UnknownPipeline, spec_for_image

app = typer.Typer(help="Pinned pipeline images: build, lock, verify (`corelab -v containers ...` logs each "
                       "command before it runs).", no_args_is_help=True)


@app.command()
def build(image: str = typer.Argument("anat", help="Image key: folder containers/<image>/."),
          base: str = typer.Option(DEFAULT_BASE, help="Base image (default: the air-gapped "
                                   "Debian base of containers/build_base.sh)."),
          lock: Path = typer.Option(LOCK_PATH, help="Lock file to record the digest in."),
          no_cache: bool = typer.Option(False, help="Rebuild every layer.")) -> None:
    """Build IMAGE with podman (--network none) and record its digest in the lock."""
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
    podman's image differs from the locked digest.
    """
    try:
        images = read_lock(repo / "containers" / "lock")
        keys = image or sorted(images)
        problems = {key: _problems(key, images, engine, repo) for key in keys}
    except (LockError, UnknownPipeline) as err:
        fail(str(err))
    for key, found in problems.items():
        typer.echo(f"{key}: " + ("ok" if not found else "; ".join(found)))
    if any(problems.values()):
        raise typer.Exit(1)


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
