"""QC of one processed series: load the raw image and the derivatives, measure, and judge.

Loading and sanity checks live here, the metrics themselves in :mod:`tasks.qc.metrics` (pure
functions on arrays) and the verdict in :mod:`tasks.qc.gate`. A metric that cannot be computed
is recorded with its reason in ``missing``; the gate turns it into a FAIL that names it.
"""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.trial import TrialConfig
from tasks.lake import tables
from tasks.lake.storage import Lake
from tasks.qc.gate import Verdict, judge, site_history
from tasks.qc.metrics import anat_iqms
from tasks.run.derivatives import PipelineRun, local_path


@dataclass
class SeriesQC:
    """One processed series: its pipeline run, its QC metrics and the gate's verdict."""

    run: PipelineRun
    metrics: dict[str, float | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    verdict: Verdict | None = None


def _load(lake: Lake, rel: str, tmp: Path) -> nib.Nifti1Image:
    return nib.load(str(local_path(lake, rel, tmp)))


def _array(lake: Lake, rel: str, tmp: Path) -> np.ndarray:
    return np.asanyarray(_load(lake, rel, tmp).dataobj, dtype=np.float32)


def measure_quality(lake: Lake, run: PipelineRun) -> SeriesQC:
    """QC metrics from the raw image and the derivatives; a missing input is a named reason."""
    sq = SeriesQC(run)
    if run.error:
        sq.missing["segmentation"] = run.error
        return sq
    try:
        with tempfile.TemporaryDirectory(prefix="corelab-qc-") as tmp, ThreadPoolExecutor(4) as pool:
            t = Path(tmp)
            # gzip decompression releases the GIL: the six images load side by side
            keys = ("preproc", "brain_mask", "GM", "WM", "CSF")
            jobs = {k: pool.submit(_array, lake, run.outputs[k], t) for k in keys}
            raw = nib.as_closest_canonical(_load(lake, run.bids_image, t))
            raw_data = np.asanyarray(raw.dataobj, dtype=np.float32)
            arrays = {k: job.result() for k, job in jobs.items()}
            if raw_data.shape[:3] != arrays["brain_mask"].shape[:3]:
                raise ValueError(f"raw image {raw_data.shape} and brain mask {arrays['brain_mask'].shape} "
                                 "are not on one grid")
            sq.metrics.update(anat_iqms(raw_data, arrays["preproc"], arrays["brain_mask"] > 0, arrays["GM"],
                                        arrays["WM"], arrays["CSF"], tuple(raw.header.get_zooms()[:3])))
    except (KeyError, FileNotFoundError, ValueError, OSError) as exc:
        sq.missing["segmentation"] = f"derivatives unreadable ({type(exc).__name__}: {exc})"
        return sq
    qc = _pipeline_qc(lake, run)
    sq.metrics["coverage"] = qc.get("template_brain_in_fov")
    bias = qc.get("bias_field") or {}
    if {"p95", "p05"} <= set(bias):
        sq.metrics["inu_range"] = float(bias["p95"]) - float(bias["p05"])
    for name in ("coverage", "inu_range"):
        if sq.metrics.get(name) is None:
            sq.missing[name] = f"{run.pipeline} did not report it"
    return sq


def _pipeline_qc(lake: Lake, run: PipelineRun) -> dict[str, Any]:
    rel = run.outputs["measures"][: -len(".tsv")] + ".json"
    return json.loads(lake.read_text(rel)).get("QC", {}) if lake.exists(rel) else {}


def gate(trial: TrialConfig, site: str, sq: SeriesQC, history: dict[str, list[float]]) -> Verdict:
    """The verdict of a measured series under the site's rules and its history."""
    sq.verdict = judge(sq.metrics, trial.qc.rules_for(site), history, trial.qc.robust_z, sq.missing)
    return sq.verdict


def judge_series(lake: Lake, trial: TrialConfig, site: str, run: PipelineRun) -> SeriesQC:
    """Measure one series and gate it on the site's rules and its own history."""
    sq = measure_quality(lake, run)
    history = site_history(tables.read_table(lake, "qc", [site]), site, run.pipeline, run.version,
                           run.series_uid)
    gate(trial, site, sq, history)
    return sq


@task(name="judge-series", cache_policy=NO_CACHE)
def judge_series_task(lake: Lake, trial: TrialConfig, site: str, run: PipelineRun) -> SeriesQC:
    return judge_series(lake, trial, site, run)
