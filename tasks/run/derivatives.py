"""Run one pinned pipeline on one BIDS image into the lake's derivatives, and read what it made.

The pipeline runs through the container runner (``podman``/``docker``/``apptainer``, or
``local`` when the installed software equals the image's lock). Its derivatives land in
``derivatives/<name>-<version>/`` with the run's provenance record beside them. A pipeline
that fails or is refused is not an exception: the :class:`PipelineRun` says why (``error``),
and the QC stage turns that into a FAIL with the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipelines.spec import PipelineSpec, bids_prefix
from tasks.lake.storage import Lake
from tasks.run.engines import ContainerRunError
from tasks.run.runner import run_pipeline

ENTITY = re.compile(r"_(acq|run)-([A-Za-z0-9]+)")


@dataclass
class PipelineRun:
    """What running one pipeline on one series' BIDS image produced (or why it could not)."""

    series_uid: str
    bids_image: str                        # lake path
    input_sha256: str
    pipeline: str
    version: str
    digest: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)   # output key -> lake path
    measures: list[dict[str, Any]] = field(default_factory=list)  # measure, value, unit
    error: str | None = None


def derivatives_root(spec: PipelineSpec) -> str:
    return f"derivatives/{spec.name}-{spec.version}"


def image_entities(bids_image: str) -> dict[str, str]:
    name = bids_image.rsplit("/", 1)[-1]
    return {k: v for k, v in ENTITY.findall(name)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_path(lake: Lake, rel: str, tmp: Path) -> Path:
    """A local file holding ``rel``: the lake's own file, or a copy in ``tmp`` for object stores."""
    if lake.is_local:
        return Path(lake.path(rel))
    dest = tmp / rel.rsplit("/", 1)[-1]
    dest.write_bytes(lake.read_bytes(rel))
    return dest


def run_on_image(lake: Lake, spec: PipelineSpec, bids_image: str, subject: str, session: str,
                 series_uid: str, backend: str, allow_version_mismatch: bool = False,
                 threads: int | None = None) -> PipelineRun:
    """Run ``spec`` on one BIDS image into the lake's derivatives; never raises for a failed run."""
    data = lake.read_bytes(bids_image)
    out = PipelineRun(series_uid, bids_image, _sha256(data), spec.name, spec.version)
    root = derivatives_root(spec)
    entities = image_entities(bids_image)
    prefix = bids_prefix(subject, session, entities)
    with tempfile.TemporaryDirectory(prefix="corelab-run-") as tmp:
        tmp_path = Path(tmp)
        # Object stores get a local working folder, uploaded when the run is complete.
        work = Path(lake.path(root)) if lake.is_local else tmp_path / "deriv"
        try:
            record = run_pipeline(spec, local_path(lake, bids_image, tmp_path), work, subject, session,
                                  backend=backend, entities=entities, threads=threads,
                                  allow_version_mismatch=allow_version_mismatch)
        except ContainerRunError as exc:  # refusals (digest, stale lock, versions) and no engine
            out.error = f"{spec.name} {spec.version} not run: {exc}"
            return out
        out.record, out.digest = record.to_dict(), record.digest
        if not record.ok:
            out.error = f"{spec.name} {spec.version} failed: {record.error or 'exit ' + str(record.exit_code)}"
        if not lake.is_local and record.ok:
            for p in sorted(work.rglob("*")):
                if p.is_file():
                    lake.put_file(str(p), f"{root}/{p.relative_to(work).as_posix()}")
    lake.write_text(f"{root}/sub-{subject}/ses-{session}/{prefix}_provenance.json",
                    json.dumps(out.record or {"error": out.error}, indent=2, default=str))
    if out.error is None:
        out.outputs = {k: f"{root}/{v}" for k, v in expected_outputs(spec, subject, session, entities).items()}
        read_measures(lake, out)
    return out


def expected_outputs(spec: PipelineSpec, subject: str, session: str, entities: dict[str, str]) -> dict[str, str]:
    names = spec.expected_outputs(subject, session, entities)
    keys = {"_desc-preproc_T1w": "preproc", "_desc-brain_mask": "brain_mask", "_label-GM_probseg": "GM",
            "_label-WM_probseg": "WM", "_label-CSF_probseg": "CSF", "_desc-volumes_measures.tsv": "measures",
            "_dseg.nii.gz": "dseg"}
    out = {}
    for name in names:
        for needle, key in keys.items():
            if needle in name:
                out[key] = name
    return out


def read_measures(lake: Lake, run: PipelineRun) -> None:
    """The pipeline's measures TSV."""
    rel = run.outputs.get("measures")
    if not rel or not lake.exists(rel):
        run.error = run.error or f"{run.pipeline} left no measures table"
        return
    df = pd.read_csv(lake.open(rel), sep="\t")
    run.measures = [{"measure": r.measure, "value": float(r.value), "unit": str(r.unit)} for r in df.itertuples()]


@task(name="run-pipeline", cache_policy=NO_CACHE)
def run_on_image_task(lake: Lake, spec: PipelineSpec, bids_image: str, subject: str, session: str,
                      series_uid: str, backend: str, allow_version_mismatch: bool = False) -> PipelineRun:
    return run_on_image(lake, spec, bids_image, subject, session, series_uid, backend, allow_version_mismatch)
