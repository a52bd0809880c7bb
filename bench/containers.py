"""Container overhead: the same pipeline run on one T1 locally and in its pinned podman image.

    python bench/containers.py [--t1 PATH] [--threads 2] [--repeats 1] [--build]

Prints, per backend, wall seconds (best of the repeats), peak resident memory of the pipeline
process, and the overhead relative to ``local``. With ``--build`` it first times
``corelab containers build`` (base image, wheelhouse and layers as cached on this machine).

The peak memory is measured the same way on both backends: the pipeline module runs under a
small wrapper that prints its own ``ru_maxrss`` on exit (a container's process is not our
child, so the host cannot see its rusage). :func:`time_backends` is importable, e.g. by
``bench/anat.py``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.registry import get_spec  # noqa: E402
from pipelines.spec import PipelineSpec  # noqa: E402
from tasks.run.runner import ContainerRunError, run_pipeline  # noqa: E402

DEFAULT_T1 = REPO.parent / "shared" / "data" / "niivue-images" / "chris_t1.nii.gz"
MARK = "CORELAB_PEAK_RSS_KB"
# Runs a module as __main__ and reports the peak RSS of itself and its children on exit.
PEAK_WRAPPER = (
    "import resource, runpy, sys\n"
    "module, sys.argv = sys.argv[1], sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    "    kb = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
    f"    print('{MARK}', kb, file=sys.stderr)\n"
)


def with_peak_memory(spec: PipelineSpec) -> PipelineSpec:
    """The same spec, its ``python -m MODULE`` entrypoint wrapped to report peak memory."""
    if spec.command[:2] != ("python", "-m"):
        raise ValueError(f"{spec.name}: only `python -m` entrypoints can be measured")
    return replace(spec, command=("python", "-c", PEAK_WRAPPER, *spec.command[2:]))


def peak_mb(stderr: str) -> float | None:
    for line in reversed(stderr.splitlines()):
        if line.startswith(MARK):
            return int(line.split()[1]) / 1024
    return None


def time_backends(t1: Path, *, spec: PipelineSpec | None = None, backends=("local", "podman"),
                  threads: int = 2, repeats: int = 1, subject: str = "bench",
                  session: str = "1") -> list[dict]:
    """Seconds (best of ``repeats``) and peak MB of one pipeline run per backend.

    Returns
    -------
    list of dict
        One row per backend: backend, seconds, peak_mb, overhead_pct (vs ``local``), ok,
        and note (why a backend did not run).
    """
    spec = with_peak_memory(spec or get_spec("anat"))
    rows = []
    for backend in backends:
        best, peak, note, ok = None, None, "", True
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix=f"bench-{backend}-") as out:
                try:
                    rec = run_pipeline(spec, t1, out, subject, session, backend=backend,
                                       threads=threads)
                except ContainerRunError as err:
                    note, ok = f"refused: {err}"[:160], False
                    break
            ok = ok and rec.ok
            note = rec.error[:160]
            if best is None or rec.duration_s < best:
                best, peak = rec.duration_s, peak_mb(rec.stderr_tail)
        rows.append({"backend": backend, "seconds": best, "peak_mb": peak, "ok": ok, "note": note})
    local = next((r["seconds"] for r in rows if r["backend"] == "local" and r["ok"]), None)
    for row in rows:
        row["overhead_pct"] = (100 * (row["seconds"] - local) / local
                               if local and row["seconds"] and row["ok"] else None)
    return rows


def time_build(image: str = "anat") -> float:
    """Seconds for ``corelab containers build IMAGE`` with this machine's caches."""
    from pipelines.image_build import build_image
    from pipelines.registry import spec_for_image

    start = time.perf_counter()
    build_image(spec_for_image(image))
    return time.perf_counter() - start


def print_table(rows: list[dict]) -> None:
    fmt = "{:<8} {:>9} {:>9} {:>10}  {}"
    print(fmt.format("backend", "seconds", "peak MB", "overhead", "note"))
    for r in rows:
        print(fmt.format(
            r["backend"], f"{r['seconds']:.1f}" if r["seconds"] else "-",
            f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-",
            f"{r['overhead_pct']:+.1f} %" if r["overhead_pct"] is not None else "-",
            r["note"] if not r["ok"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t1", type=Path, default=DEFAULT_T1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--build", action="store_true", help="time the image build first")
    args = parser.parse_args()
    if not args.t1.is_file():
        sys.exit(f"T1 {args.t1} not found (../shared/data missing?)")
    if args.build:
        print(f"build anat image: {time_build():.1f} s")
    print(f"T1: {args.t1.name}, threads {args.threads}, best of {args.repeats}")
    print_table(time_backends(args.t1, threads=args.threads, repeats=args.repeats))


if __name__ == "__main__":
    main()
