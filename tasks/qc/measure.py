"""QC of one processed series: load its images through the pipeline's spec, measure, and judge.

What to measure comes from the spec: the image metric groups it asks for (computed here from
the raw image and the outputs each group needs, :data:`tasks.qc.metrics.GROUPS`) and the QC
values it reports itself in a sidecar (``qc_sidecar``, ``qc_metrics``). Loading, sanity checks
and threads live here; the metrics themselves in :mod:`tasks.qc.metrics` (pure functions) and
the verdict in :mod:`tasks.qc.gate`. A metric that cannot be computed is recorded with its
reason in ``missing``; the gate turns it into a FAIL that names it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.trial import TrialConfig
from pipelines.spec import PipelineSpec, SidecarMetric, sidecar_of
from tasks.errors import TRANSIENT_RETRIES, is_transient
from tasks.lake import tables
from tasks.lake.storage import Lake
from tasks.qc import metrics as m
from tasks.qc.gate import Unmeasured, Verdict, judge, site_history
from tasks.run.derivatives import PipelineRun

# The pseudo-metric a pipeline that produced nothing usable fails on ("outputs could not be computed").
OUTPUTS = "outputs"


@dataclass
class SeriesQC:
    """One processed series: its pipeline run, its QC metrics and the gate's verdict."""

    run: PipelineRun
    metrics: dict[str, float | None] = field(default_factory=dict)
    missing: dict[str, Unmeasured] = field(default_factory=dict)
    verdict: Verdict | None = None


def needed_outputs(groups: tuple[str, ...]) -> list[str]:
    """The output keys the image metric groups are computed from, in a stable order."""
    return list(dict.fromkeys(k for g in groups for k in m.GROUPS[g][1]))


def image_metrics(groups: tuple[str, ...], raw: np.ndarray, zooms: tuple[float, ...],
                  images: Mapping[str, np.ndarray]) -> dict[str, float | m.NotComputed]:
    """The metrics of ``groups`` on a RAS-ordered raw image and the outputs on its grid.

    As MRIQC does, the tissue statistics (SNR, CNR, CJV) come from the bias-corrected image and
    EFC, FBER and WM2MAX from the raw one; a tissue's voxels are those at least
    ``TISSUE_PROBABILITY`` sure of it. The metrics are independent passes over a few large
    arrays and numpy leaves the GIL while it sorts, reduces and indexes, so two threads share
    them (1.1 -> 0.67 s on a 1 mm T1).
    """
    raw = raw.astype(np.float32)
    voxel_mm3 = float(np.prod(zooms[:3]))
    out: dict[str, Any] = {}
    with ThreadPoolExecutor(2) as pool:
        head = pool.submit(m.head_mask, raw)
        jobs = {}
        if "head" in groups:
            jobs |= {"efc": pool.submit(m.efc, raw), "fov_cut": pool.submit(m.fov_cut, raw, zooms)}
        if "tissue" in groups:
            brain = images["brain_mask"] > 0
            g = (images["probseg_GM"] >= m.TISSUE_PROBABILITY) & brain
            w = (images["probseg_WM"] >= m.TISSUE_PROBABILITY) & brain
            jobs["wm2max"] = pool.submit(m.wm2max, raw, w)
            tg, tw = m.tissue_stats(images["preproc"], g), m.tissue_stats(images["preproc"], w)
        if "head" in groups:
            jobs["fber"] = pool.submit(lambda: m.fber(raw, head.result()))
        if "tissue" in groups:
            noise = m.air_sd(images["preproc"], head.result())
            out |= {"snr_gm": m.snr(tg), "snr_wm": m.snr(tw), "cnr": m.cnr(tg, tw, noise), "cjv": m.cjv(tg, tw)}
        if "volumes" in groups:
            brain = images["brain_mask"] > 0
            tiv = float(brain.sum()) * voxel_mm3
            gm_v, wm_v, csf_v = (float(np.sum(images[k], where=brain, dtype=np.float64)) * voxel_mm3
                                 for k in ("probseg_GM", "probseg_WM", "probseg_CSF"))
            out |= {"tiv_cm3": tiv / 1000.0, "gm_fraction": gm_v / tiv if tiv else np.nan,
                    "wm_fraction": wm_v / tiv if tiv else np.nan, "csf_fraction": csf_v / tiv if tiv else np.nan}
        out |= {name: job.result() for name, job in jobs.items()}
    order = [name for g in groups for name in m.GROUPS[g][0]]
    return {name: out[name] for name in order}


def _load(lake: Lake, rel: str, tmp: Path) -> nib.Nifti1Image:
    return nib.load(lake.local_file(rel, tmp))


def _array(lake: Lake, rel: str, tmp: Path) -> np.ndarray:
    return np.asanyarray(_load(lake, rel, tmp).dataobj, dtype=np.float32)


def measure_quality(lake: Lake, spec: PipelineSpec, run: PipelineRun) -> SeriesQC:
    """QC metrics from the raw image and the derivatives; a missing input is a named reason."""
    sq = SeriesQC(run)
    if run.error:
        sq.missing[OUTPUTS] = Unmeasured(run.error, run.error_code or "pipeline_failed")
        return sq
    if spec.image_qc:
        try:
            with tempfile.TemporaryDirectory(prefix="corelab-qc-") as tmp, ThreadPoolExecutor(4) as pool:
                t = Path(tmp)
                # gzip decompression releases the GIL: the images load side by side
                jobs = {k: pool.submit(_array, lake, run.outputs[k], t) for k in needed_outputs(spec.image_qc)}
                raw = nib.as_closest_canonical(_load(lake, run.bids_image, t))
                raw_data = np.asanyarray(raw.dataobj, dtype=np.float32)
                images = {k: job.result() for k, job in jobs.items()}
                for key, image in images.items():
                    if raw_data.shape[:3] != image.shape[:3]:
                        raise ValueError(f"raw image {raw_data.shape} and {key} {image.shape} are not on one grid")
                values = image_metrics(spec.image_qc, raw_data, tuple(raw.header.get_zooms()[:3]), images)
        except (KeyError, FileNotFoundError, ValueError, OSError) as exc:
            if is_transient(exc):  # the lake is down, the derivatives are not at fault: retried
                raise
            sq.missing[OUTPUTS] = Unmeasured(f"derivatives unreadable ({type(exc).__name__}: {exc})",
                                             "derivatives_unreadable")
            return sq
        for name, value in values.items():
            if isinstance(value, m.NotComputed):
                sq.metrics[name], sq.missing[name] = None, Unmeasured(value.why)
            else:
                sq.metrics[name] = value
    reported = _reported_qc(lake, spec, run)
    for sm in spec.qc_metrics:
        sq.metrics[sm.metric] = _sidecar_value(reported, sm)
        if sq.metrics[sm.metric] is None:
            said = _at(reported, sm.path) is not _ABSENT  # a null: measured, not measurable
            sq.missing[sm.metric] = Unmeasured(f"{run.pipeline} could not measure it" if said
                                               else f"{run.pipeline} did not report it")
    return sq


def _reported_qc(lake: Lake, spec: PipelineSpec, run: PipelineRun) -> dict[str, Any]:
    """The ``QC`` object of the sidecar the spec names (empty when there is none)."""
    if spec.qc_sidecar is None:
        return {}
    rel = sidecar_of(run.outputs[spec.qc_sidecar])
    return json.loads(lake.read_text(rel)).get("QC", {}) if lake.exists(rel) else {}


#: What :func:`_at` gives for a dotted key the sidecar does not have.
_ABSENT = object()


def _at(qc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted key of the sidecar's QC object (a null is None), else :data:`_ABSENT`."""
    value: Any = qc
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _sidecar_value(qc: Mapping[str, Any], sm: SidecarMetric) -> float | None:
    def get(path: str) -> Any:
        value = _at(qc, path)
        return None if value is _ABSENT else value

    value = get(sm.path)
    if sm.minus is None:
        return value
    other = get(sm.minus)
    return None if value is None or other is None else float(value) - float(other)


def gate(trial: TrialConfig, site: str, sq: SeriesQC, history: dict[str, list[float]]) -> Verdict:
    """The verdict of a measured series under the site's rules and its history."""
    sq.verdict = judge(sq.metrics, trial.qc.rules_for(site), history, trial.qc.robust_z, sq.missing)
    return sq.verdict


def judge_series(lake: Lake, trial: TrialConfig, site: str, spec: PipelineSpec, run: PipelineRun) -> SeriesQC:
    """Measure one series and gate it on the site's rules and its own history."""
    sq = measure_quality(lake, spec, run)
    history = site_history(tables.read_table(lake, "qc", [site]), site, run.pipeline, run.version,
                           run.series_uid)
    gate(trial, site, sq, history)
    return sq


@task(name="judge-series", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def judge_series_task(lake: Lake, trial: TrialConfig, site: str, spec: PipelineSpec, run: PipelineRun) -> SeriesQC:
    return judge_series(lake, trial, site, spec, run)
