"""Process one BIDS image with one pinned pipeline, measure its quality, and judge it.

The pipeline runs through the container runner (``podman``/``docker``/
``apptainer``, or ``local`` when the installed software equals the image's
lock). Its derivatives land in ``derivatives/<name>-<version>/`` with the run's
provenance record beside them; QC metrics come from the raw image and the
derivatives; the gate gives PASS, WARN or FAIL. A pipeline that fails, an
output that is missing and a metric that cannot be computed are FAILs with that
reason: nothing crashes the flow and nothing becomes a silent row.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from data_contracts.trial import TrialConfig
from pipelines.spec import PipelineSpec, bids_prefix
from tasks.container_engines import ContainerRunError
from tasks.container_runner import run_pipeline
from tasks.qc_gate import Verdict, judge
from tasks.qc_metrics import anat_iqms
from tasks.storage import Lake

ENTITY = re.compile(r"_(acq|run)-([A-Za-z0-9]+)")


@dataclass
class SeriesProcessing:
    """What processing one series produced (or why it could not)."""

    series_uid: str
    bids_image: str                        # lake path
    input_sha256: str
    pipeline: str
    version: str
    digest: str = ""
    record: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)   # output key -> lake path
    measures: list[dict[str, Any]] = field(default_factory=list)  # measure, value, unit
    metrics: dict[str, float | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    verdict: Verdict | None = None
    error: str | None = None


def derivatives_root(spec: PipelineSpec) -> str:
    return f"derivatives/{spec.name}-{spec.version}"


def image_entities(bids_image: str) -> dict[str, str]:
    name = bids_image.rsplit("/", 1)[-1]
    return {k: v for k, v in ENTITY.findall(name)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local(lake: Lake, rel: str, tmp: Path) -> Path:
    if lake.is_local:
        return Path(lake.path(rel))
    dest = tmp / rel.rsplit("/", 1)[-1]
    dest.write_bytes(lake.read_bytes(rel))
    return dest


def run_on_image(lake: Lake, spec: PipelineSpec, bids_image: str, subject: str, session: str,
                 series_uid: str, backend: str, allow_version_mismatch: bool = False,
                 threads: int | None = None) -> SeriesProcessing:
    """Run ``spec`` on one BIDS image into the lake's derivatives; never raises for a failed run."""
    data = lake.read_bytes(bids_image)
    out = SeriesProcessing(series_uid, bids_image, _sha256(data), spec.name, spec.version)
    root = derivatives_root(spec)
    entities = image_entities(bids_image)
    prefix = bids_prefix(subject, session, entities)
    with tempfile.TemporaryDirectory(prefix="corelab-run-") as tmp:
        tmp_path = Path(tmp)
        # Object stores get a local working folder, uploaded when the run is complete.
        work = Path(lake.path(root)) if lake.is_local else tmp_path / "deriv"
        try:
            record = run_pipeline(spec, _local(lake, bids_image, tmp_path), work, subject, session,
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
        out.outputs = {k: f"{root}/{v}" for k, v in _expected(spec, subject, session, entities).items()}
    return out


def _expected(spec: PipelineSpec, subject: str, session: str, entities: dict[str, str]) -> dict[str, str]:
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


def read_measures(lake: Lake, sp: SeriesProcessing) -> None:
    """The pipeline's measures TSV, and the QC values it reported beside it."""
    rel = sp.outputs.get("measures")
    if not rel or not lake.exists(rel):
        sp.error = sp.error or f"{sp.pipeline} left no measures table"
        return
    df = pd.read_csv(lake.open(rel), sep="\t")
    sp.measures = [{"measure": r.measure, "value": float(r.value), "unit": str(r.unit)} for r in df.itertuples()]


def _load(lake: Lake, rel: str, tmp: Path) -> nib.Nifti1Image:
    return nib.load(str(_local(lake, rel, tmp)))


def _array(lake: Lake, rel: str, tmp: Path) -> np.ndarray:
    return np.asanyarray(_load(lake, rel, tmp).dataobj, dtype=np.float32)


def measure_quality(lake: Lake, sp: SeriesProcessing) -> None:
    """QC metrics from the raw image and the derivatives; a missing input is a named reason."""
    if sp.error:
        sp.missing["segmentation"] = sp.error
        return
    try:
        with tempfile.TemporaryDirectory(prefix="corelab-qc-") as tmp, ThreadPoolExecutor(4) as pool:
            t = Path(tmp)
            # gzip decompression releases the GIL: the six images load side by side
            keys = ("preproc", "brain_mask", "GM", "WM", "CSF")
            jobs = {k: pool.submit(_array, lake, sp.outputs[k], t) for k in keys}
            raw = nib.as_closest_canonical(_load(lake, sp.bids_image, t))
            raw_data = np.asanyarray(raw.dataobj, dtype=np.float32)
            arrays = {k: job.result() for k, job in jobs.items()}
            if raw_data.shape[:3] != arrays["brain_mask"].shape[:3]:
                raise ValueError(f"raw image {raw_data.shape} and brain mask {arrays['brain_mask'].shape} "
                                 "are not on one grid")
            sp.metrics.update(anat_iqms(raw_data, arrays["preproc"], arrays["brain_mask"] > 0, arrays["GM"],
                                        arrays["WM"], arrays["CSF"], tuple(raw.header.get_zooms()[:3])))
    except (KeyError, FileNotFoundError, ValueError, OSError) as exc:
        sp.missing["segmentation"] = f"derivatives unreadable ({type(exc).__name__}: {exc})"
        return
    qc = _pipeline_qc(lake, sp)
    sp.metrics["coverage"] = qc.get("template_brain_in_fov")
    field = qc.get("bias_field") or {}
    if {"p95", "p05"} <= set(field):
        sp.metrics["inu_range"] = float(field["p95"]) - float(field["p05"])
    for name in ("coverage", "inu_range"):
        if sp.metrics.get(name) is None:
            sp.missing[name] = f"{sp.pipeline} did not report it"


def _pipeline_qc(lake: Lake, sp: SeriesProcessing) -> dict[str, Any]:
    rel = sp.outputs["measures"][: -len(".tsv")] + ".json"
    return json.loads(lake.read_text(rel)).get("QC", {}) if lake.exists(rel) else {}


def site_history(qc_rows: pd.DataFrame, site: str, pipeline: str, version: str, exclude: str
                 ) -> dict[str, list[float]]:
    """This site's earlier metric values, from series whose verdict was PASS or WARN."""
    if qc_rows.empty:
        return {}
    rows = qc_rows[(qc_rows["site"] == site) & (qc_rows["pipeline_name"] == pipeline)
                   & (qc_rows["pipeline_version"] == version) & (qc_rows["series_uid"] != exclude)
                   & (qc_rows["verdict"].isin(["PASS", "WARN"])) & (qc_rows["metric"] != "verdict")]
    return {m: [v for v in g["value"] if v is not None and math.isfinite(v)]
            for m, g in rows.groupby("metric")}


def gate(trial: TrialConfig, site: str, sp: SeriesProcessing, history: dict[str, list[float]]) -> Verdict:
    sp.verdict = judge(sp.metrics, trial.qc.rules_for(site), history, trial.qc.robust_z, sp.missing)
    return sp.verdict

