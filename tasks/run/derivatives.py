"""Run one pinned pipeline on one BIDS image into the lake's derivatives, and read what it made.

The pipeline runs through the container runner (``podman``/``docker``/``apptainer``, or
``local`` when the installed software equals the image's lock). Its derivatives land in
``derivatives/<name>-<version>/`` with the run's provenance record beside them. Everything is
read back through the pipeline's spec: its outputs by key, its measures with their units.

A pipeline that ran on the data and failed is not an exception: the :class:`PipelineRun` says
why (``error``, ``error_code``), and the QC stage turns that into a FAIL with the reason. A
pipeline that could not run at all (no engine on this worker, a refused image, an environment
that differs from the lock, the lake or the engine not answering) says nothing about the data:
it is raised (:class:`~tasks.run.engines.ContainerRunError`, a reason code of the
``infrastructure`` category), so the run fails, red in Prefect, with no verdict, deviation or site
query; Prefect retries the transient ones and the nightly run picks the series up again.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.bids import parse_entities
from pipelines.registry import get_spec
from pipelines.spec import PipelineSpec, bids_prefix
from tasks.errors import TRANSIENT_RETRIES
from tasks.lake.storage import Lake
from tasks.run.engines import ENGINE_ERROR_EXIT, OCI_ENGINES, EngineUnavailable
from tasks.run.runner import run_pipeline


@dataclass
class PipelineRun:
    """What running one pipeline on one series' BIDS image produced (or why it could not)."""

    series_uid: str
    bids_image: str                        # lake path
    input_sha256: str
    pipeline: str
    version: str
    digest: str = ""                       # the image that ran; empty for the local backend
    backend: str = ""
    environment_sha256: str = ""           # local backend: the software it ran with
    record: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)   # output key -> lake path
    measures: list[dict[str, Any]] = field(default_factory=list)  # measure, value, unit
    error: str | None = None
    error_code: str | None = None          # data_contracts.reasons, when error is set

    def fail(self, message: str, code: str) -> None:
        """Record the first reason this run produced nothing usable (later ones add nothing)."""
        if self.error is None:
            self.error, self.error_code = message, code


def derivatives_root(spec: PipelineSpec) -> str:
    return f"derivatives/{spec.name}-{spec.version}"


def image_entities(bids_file: str) -> dict[str, str]:
    """The entities of a BIDS file's name beyond subject and session (``acq``, ``ce``, ``run`` ...)."""
    return {k: v for k, v in parse_entities(bids_file).items() if k not in ("sub", "ses")}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


COMPANION_EXTENSIONS = (".json", ".bval", ".bvec")   # as tasks.run.engines.companions mounts them


def stage_bids_image(lake: Lake, bids_image: str, tmp: Path) -> Path:
    """A local path of a BIDS image inside its dataset, as the pipeline sees it on a local lake.

    On an object store the image is copied to ``tmp`` at its own path below ``bids/``, beside the
    dataset's ``dataset_description.json``, so a pipeline that names its raw source (``RawSources``
    ``bids:raw:sub-.../anat/...``) finds the dataset root as it does on disk; and with the files BIDS
    keeps beside it under its name (its JSON sidecar, a dwi's ``.bval``/``.bvec``), which the
    pipelines read as part of their input (without them on S3 the bold pipeline found no
    SliceTiming and the dwi pipeline no gradient table).
    """
    if lake.is_local:
        return Path(lake.path(bids_image))
    folder = tmp / posixpath.dirname(bids_image)
    folder.mkdir(parents=True, exist_ok=True)
    description = "bids/dataset_description.json"
    if lake.exists(description):
        lake.local_file(description, tmp / "bids")
    stem = bids_image.removesuffix(".gz").removesuffix(".nii")
    for ext in COMPANION_EXTENSIONS:
        if lake.exists(stem + ext):
            lake.local_file(stem + ext, folder)
    return Path(lake.local_file(bids_image, folder))


def stage_upstream(lake: Lake, upstream: Mapping[str, str], tmp: Path) -> dict[str, Path]:
    """Local paths of other pipelines' outputs (lake paths) this run takes; copied on an object store."""
    if lake.is_local:
        return {k: Path(lake.path(v)) for k, v in upstream.items()}
    out = {}
    for key, rel in upstream.items():
        folder = tmp / "upstream" / posixpath.dirname(rel)
        folder.mkdir(parents=True, exist_ok=True)
        out[key] = Path(lake.local_file(rel, folder))
    return out


def upstream_inputs(spec: PipelineSpec, subject: str, session: str,
                    usable: Mapping[str, list[str]]) -> dict[str, str]:
    """The lake paths of the upstream outputs ``spec`` takes for one session.

    ``usable`` maps an upstream pipeline's name to the BIDS images of this session it processed
    and judged usable (PASS or WARN), in series order; the first one's outputs are taken (a
    session with two T1s gives the dwi pipeline the first usable one, and the run's inputs name
    it). A pipeline with nothing usable gives nothing: the pipeline runs without it.
    """
    out: dict[str, str] = {}
    for up in spec.upstream:
        images = usable.get(up.pipeline) or []
        if images:
            producer = get_spec(up.pipeline)
            out[up.key] = lake_outputs(producer, subject, session, image_entities(images[0]))[up.output]
    return out


def run_on_image(lake: Lake, spec: PipelineSpec, bids_image: str, subject: str, session: str,
                 series_uid: str, backend: str, allow_version_mismatch: bool = False,
                 threads: int | None = None, upstream: Mapping[str, str] | None = None) -> PipelineRun:
    """Run ``spec`` on one BIDS image into the lake's derivatives (``upstream``: key -> lake path
    of another pipeline's output it takes, see :func:`upstream_inputs`).

    A run that failed on the data is recorded in the result. A run that could not be attempted
    (ContainerRunError: no engine, a refused image, a version mismatch) and a transient failure
    (StorageUnavailable, EngineUnavailable) are raised: they are not facts about the data.
    """
    data = lake.read_bytes(bids_image)
    out = PipelineRun(series_uid, bids_image, _sha256(data), spec.name, spec.version)
    root = derivatives_root(spec)
    entities = image_entities(bids_image)
    prefix = bids_prefix(subject, session, entities)
    unsupported = sorted(set(entities) - set(spec.entities))
    if unsupported:  # dropping one would give two inputs the same derivatives
        out.fail(f"{spec.name} {spec.version} not run: it takes no BIDS entit{'y' if len(unsupported) == 1 else 'ies'} "
                 f"{', '.join(unsupported)} (it takes {', '.join(spec.entities) or 'none'}); "
                 f"{bids_image.rsplit('/', 1)[-1]} is not processed", "input_unsupported")
        return out
    with tempfile.TemporaryDirectory(prefix="corelab-run-") as tmp:
        tmp_path = Path(tmp)
        # Object stores get a local working folder, uploaded when the run is complete.
        work = Path(lake.path(root)) if lake.is_local else tmp_path / "deriv"
        # refusals (digest, stale lock, versions) and a missing engine raise ContainerRunError
        record = run_pipeline(spec, stage_bids_image(lake, bids_image, tmp_path), work, subject, session,
                              backend=backend, entities=entities, threads=threads,
                              allow_version_mismatch=allow_version_mismatch,
                              upstream=stage_upstream(lake, upstream or {}, tmp_path))
        if record.exit_code == ENGINE_ERROR_EXIT and backend in OCI_ENGINES:
            raise EngineUnavailable(f"{backend} failed to run {spec.name} {spec.version} (exit "
                                    f"{ENGINE_ERROR_EXIT}, the engine's own error): {record.error}")
        out.record, out.digest = record.to_dict(), record.digest
        out.backend, out.environment_sha256 = record.backend, record.environment_sha256
        if not record.ok:
            out.fail(f"{spec.name} {spec.version} failed: {record.error or 'exit ' + str(record.exit_code)}",
                     failure_code(record.exit_code))
        if not lake.is_local and record.ok:
            for p in sorted(work.rglob("*")):
                if p.is_file():
                    lake.put_file(str(p), f"{root}/{p.relative_to(work).as_posix()}")
    lake.write_text(f"{root}/sub-{subject}/ses-{session}/{prefix}_provenance.json",
                    json.dumps(out.record or {"error": out.error}, indent=2, default=str))
    write_bidsignore(lake, spec)
    if out.error is None:
        out.outputs = lake_outputs(spec, subject, session, entities)
        read_measures(lake, spec, out)
    return out


PROVENANCE_PATTERN = "*_provenance.json"   # corelab's record of each run, beside its outputs


def write_bidsignore(lake: Lake, spec: PipelineSpec) -> None:
    """The derivatives' ``.bidsignore``: the spec's non-BIDS outputs and corelab's provenance files."""
    rel = f"{derivatives_root(spec)}/.bidsignore"
    text = "\n".join(sorted({*spec.bids_ignore, PROVENANCE_PATTERN})) + "\n"
    if not (lake.exists(rel) and lake.read_text(rel) == text):
        lake.write_text(rel, text)


def lake_outputs(spec: PipelineSpec, subject: str, session: str, entities: dict[str, str]) -> dict[str, str]:
    """Output key -> lake path of every output the spec promises for one input."""
    root = derivatives_root(spec)
    return {k: f"{root}/{v}" for k, v in spec.expected_outputs(subject, session, entities).items()}


def failure_code(exit_code: int | None) -> str:
    """Why a pipeline that ran left nothing usable: stopped, failed, or exited 0 without an output."""
    if exit_code is None:
        return "pipeline_timeout"
    return "pipeline_failed" if exit_code != 0 else "pipeline_incomplete"


def read_measures(lake: Lake, spec: PipelineSpec, run: PipelineRun) -> None:
    """The pipeline's measures table, checked against the measures and units its spec declares."""
    if not spec.measures:
        return
    rel = run.outputs.get("measures")
    if not rel or not lake.exists(rel):
        run.fail(f"{run.pipeline} left no measures table", "pipeline_incomplete")
        return
    run.measures = measures_table(lake.read_bytes(rel))
    declared = {m.name: m.unit for m in spec.measures}
    reported = {m["measure"]: m["unit"] for m in run.measures}
    optional = {m.name for m in spec.measures if m.optional}
    wrong = sorted(f"{k} [{reported.get(k, 'absent')}, declared {declared.get(k, 'nothing')}]"
                   for k in set(reported) | set(declared)
                   if reported.get(k) != declared.get(k) and not (k in optional and k not in reported))
    if wrong:
        run.measures = []
        run.fail(f"{run.pipeline} {run.version} measures differ from its spec: {'; '.join(wrong)}",
                 "pipeline_incomplete")


def measures_table(data: bytes) -> list[dict[str, Any]]:
    """The rows of a ``measure``/``value``/``unit`` TSV."""
    df = pd.read_csv(io.BytesIO(data), sep="\t")
    return [{"measure": r.measure, "value": float(r.value), "unit": str(r.unit)} for r in df.itertuples()]


@task(name="run-pipeline", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def run_on_image_task(lake: Lake, spec: PipelineSpec, bids_image: str, subject: str, session: str,
                      series_uid: str, backend: str, allow_version_mismatch: bool = False,
                      threads: int | None = None, upstream: Mapping[str, str] | None = None) -> PipelineRun:
    return run_on_image(lake, spec, bids_image, subject, session, series_uid, backend, allow_version_mismatch,
                        threads, upstream)
