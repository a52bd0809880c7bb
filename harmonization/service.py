"""The four things a user asks of harmonization: fit or apply, on a table file or on the lake.

Table mode (a statistician's CSV/Parquet) and lake mode (the trial's
``biomarkers``) share one path: build :class:`HarmonizationData`, fit or apply
(:mod:`harmonization.combat`), store the model (:mod:`harmonization.model_store`),
write the harmonized values, write the report. A refused fit still writes its
report (why it was refused) before the refusal propagates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, model_store, report
from harmonization import lake as lake_io
from harmonization.errors import Finding, HarmonizationRefused, NoRowsToHarmonize
from harmonization.extend import extend as extend_model
from harmonization.inputs import from_wide_table, read_table_file, write_back, write_table_file
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake


@dataclass
class Outcome:
    """What a fit or apply did, for the CLI, the flow and the audit log."""

    model_id: str
    rows: int
    harmonized: int
    findings: list[Finding] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "rows": self.rows, "harmonized": self.harmonized,
                "warnings": [f.message for f in self.findings if f.level == "warning"],
                "outputs": self.outputs}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fit_and_store(lake: Lake, data: Any, settings: HarmonizationSettings,
                   extra_meta: dict[str, Any]) -> tuple[combat.FitResult, str]:
    start = time.perf_counter()
    result = combat.fit(data, settings)
    result.model.metadata.update(extra_meta)
    result.model.metadata["created_at"] = _now()
    result.model.metadata["fit_seconds"] = round(time.perf_counter() - start, 3)
    return result, model_store.save_model(lake, result.model)


def fit_table(lake: Lake, table: str, batch_col: str, settings: HarmonizationSettings,
              out: str, report_path: str | None = None, features: list[str] | None = None,
              exclude: list[str] | None = None, subject_col: str | None = None,
              source: str | None = None) -> Outcome:
    """Fit on a wide table file, store the model in ``lake``, write the harmonized table.
    ``source``: what the model and report call the input (default: the file's path).

    Raises
    ------
    HarmonizationRefused
        After writing the refusal report (when ``report_path`` is given).
    """
    df = read_table_file(table)
    data = from_wide_table(df, batch_col, settings.covariates, features, exclude, source=source or table,
                           subject_col=subject_col)
    try:
        result, model_id = _fit_and_store(lake, data, settings, {"batch_column": batch_col})
    except HarmonizationRefused as exc:
        if report_path:
            report.write_report(report.refusal_report(data, settings.covariates, exc), report_path)
        raise
    outputs = {"table": str(write_table_file(write_back(df, result.harmonized), out)),
               "model": lake.uri(model_store.model_dir(model_id))}
    if report_path:
        html, js = report.write_report(report.fit_report(data, result, model_id), report_path)
        outputs.update(report=str(html), report_json=str(js))
    return Outcome(model_id, data.n, data.n, result.findings, outputs)


def _table_for(model: combat.ComBatModel, table: str, batch_col: str | None) -> tuple[pd.DataFrame, Any]:
    """A table file read for a stored model: its features and covariates, its batch column unless
    another is named; a table without rows is refused."""
    batch_col = batch_col or model.metadata.get("batch_column") or "SITE"
    df = read_table_file(table)
    data = from_wide_table(df, batch_col, model.encoding.names, model.features, source=table)
    if data.n == 0:
        raise NoRowsToHarmonize([Finding("refusal", "no_rows", f"{table}: no rows to harmonize",
                                         {"source": table})])
    return df, data


def apply_table(lake: Lake, model_id: str, table: str, out: str, batch_col: str | None = None,
                report_path: str | None = None) -> Outcome:
    """Apply a stored model to a wide table file; rows it cannot speak for keep a reason."""
    model = model_store.load_model(lake, model_id)
    df, data = _table_for(model, table, batch_col)
    result = combat.apply(model, data, model_id)
    outputs = {"table": str(write_table_file(write_back(df, result.harmonized, result.status), out))}
    if report_path:
        html, js = report.write_report(report.apply_report(model, model_id, data, result),
                                       report_path)
        outputs.update(report=str(html), report_json=str(js))
    return Outcome(model_id, data.n, int(result.ok.sum()), result.findings, outputs)


def extend_table(lake: Lake, model_id: str, table: str, out: str, batch_col: str | None = None,
                 report_path: str | None = None) -> Outcome:
    """Estimate the table's new batches against a stored model (:mod:`harmonization.extend`), store
    the child model, write the whole table harmonized with it (old batches exactly as the parent)."""
    parent = model_store.load_model(lake, model_id)
    df, data = _table_for(parent, table, batch_col)
    result = extend_model(parent, data, model_id)
    result.model.metadata["created_at"] = _now()
    child_id = model_store.save_model(lake, result.model)
    outputs = {"table": str(write_table_file(write_back(df, result.applied.harmonized, result.applied.status), out)),
               "model": lake.uri(model_store.model_dir(child_id))}
    if report_path:
        rep = report.extend_report(result.model, child_id, data, result.applied, result.estimated)
        html, js = report.write_report(rep, report_path)
        outputs.update(report=str(html), report_json=str(js))
    append_event(lake, "harmonization_model_extended", model_id=child_id, parent=model_id,
                 batches=result.estimated)
    return Outcome(child_id, data.n, int(result.applied.ok.sum()), result.findings, outputs)


def fit_lake(lake: Lake, rows: pd.DataFrame, covariates: pd.DataFrame,
             settings: HarmonizationSettings,
             source: str = "lake biomarkers (reference set)") -> tuple[combat.ComBatModel, Outcome]:
    """Fit on the reference rows of the lake; store model and report; log to the audit chain.

    The model records its trial (``trial_id`` in its metadata) when the rows are of one
    trial: only such a model can be promoted for that trial (:func:`model_store.promote`).
    """
    data, left_out = lake_io.to_wide(rows, covariates, settings, source)
    trials = rows["trial_id"].dropna().unique() if "trial_id" in rows.columns else []
    meta = {"trial_id": str(trials[0])} if len(trials) == 1 else {}
    try:
        if data.n == 0 and left_out:  # say why nothing is left, not only that nothing is
            raise NoRowsToHarmonize([Finding("refusal", "no_rows", f"{source}: no rows to fit: "
                                             + "; ".join(f.message for f in left_out), {})])
        result, model_id = _fit_and_store(lake, data, settings, meta)
    except HarmonizationRefused as exc:
        exc.findings[:0] = left_out
        html = None
        if data.n:  # no rows: no sites to describe or draw, the reasons are the whole report
            name = f"refused-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
            html, _ = report.save_report(lake, report.refusal_report(data, settings.covariates, exc),
                                         name)
        append_event(lake, "harmonization_refused", report=html,
                     reasons=[f.message for f in exc.findings if f.level == "refusal"])
        raise
    result.findings[:0] = left_out
    rep = report.fit_report(data, result, model_id)
    html, js = report.save_report(lake, rep, model_id)
    append_event(lake, "harmonization_model_fitted", model_id=model_id, rows=data.n,
                 batches=result.model.batches, report=html)
    return result.model, Outcome(model_id, data.n, data.n, result.findings,
                                 {"model": model_store.model_dir(model_id), "report": html,
                                  "report_json": js})


def apply_lake(lake: Lake, model: combat.ComBatModel, model_id: str, rows: pd.DataFrame,
               covariates: pd.DataFrame, settings: HarmonizationSettings,
               only_new: bool = True) -> Outcome:
    """Apply a frozen model to QC-passed lake rows and upsert ``biomarkers_harmonized``."""
    data, left_out = lake_io.to_wide(rows, covariates, settings, "lake biomarkers")
    if only_new:
        done = lake_io.already_harmonized(lake, model_id)
        data = data.subset([key not in done for key in data.features.index])
    if data.n == 0:
        return Outcome(model_id, 0, 0, left_out, {})
    # Scans the model cannot speak for are a decision to record, not a failed night.
    result = combat.apply(model, data, model_id, refuse_empty=False)
    per_site = lake_io.harmonized_rows(rows, result.harmonized[result.ok], result.batch[result.ok],
                                       model_id)
    written = lake_io.write_harmonized(lake, per_site)
    name = f"{model_id}-apply-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    html, js = report.save_report(lake, report.apply_report(model, model_id, data, result), name)
    findings = left_out + result.findings
    append_event(lake, "harmonization_applied", model_id=model_id, scans=data.n,
                 harmonized=int(result.ok.sum()), rows_written=written, report=html,
                 needs_refit=[f.message for f in result.findings])
    return Outcome(model_id, data.n, int(result.ok.sum()), findings,
                   {"report": html, "report_json": js})


def extend_lake(lake: Lake, model: combat.ComBatModel, model_id: str, rows: pd.DataFrame,
                covariates: pd.DataFrame, settings: HarmonizationSettings
                ) -> tuple[combat.ComBatModel, str, Outcome | None]:
    """The nightly's new batches (a site that joined, a scanner epoch that began) estimated against
    the frozen model once they have ``min_site_n`` usable scans: a child model, stored and
    audited, which changes no value harmonized before. Each subject counts once in a new batch
    (its first scan there: a new scanner epoch has follow-up visits only). Returns the model to
    apply (the child, or the model as it was) and what was done (None: nothing new)."""
    usable = lake_io.select_rows(rows, None, settings.reference_qc_status)
    data, _ = lake_io.to_wide(usable, covariates, settings, "lake biomarkers (new batches)")
    new = sorted(set(data.batch.dropna()) - set(model.batch_map))
    if not new:
        return model, model_id, None
    fresh = data.subset(data.batch.isin(new).to_numpy())
    first = ~fresh.subjects.duplicated().to_numpy() if fresh.subjects is not None else np.ones(fresh.n, bool)
    candidates = fresh.subset(first)
    try:
        result = extend_model(model, candidates, model_id, settings.min_site_n)
    except HarmonizationRefused as exc:   # too few scans yet: the apply says they need more
        return model, model_id, Outcome(model_id, candidates.n, 0, exc.findings, {})
    result.model.metadata["created_at"] = _now()
    child_id = model_store.save_model(lake, result.model)
    html, js = report.save_report(lake, report.extend_report(result.model, child_id, candidates, result.applied,
                                                             result.estimated), child_id)
    append_event(lake, "harmonization_model_extended", model_id=child_id, parent=model_id,
                 batches=result.estimated, report=html)
    return result.model, child_id, Outcome(child_id, candidates.n, int(result.applied.ok.sum()), result.findings,
                                           {"model": model_store.model_dir(child_id), "report": html,
                                            "report_json": js})


def skipped(reason: str) -> dict[str, Any]:
    """The summary of a step that did nothing, on purpose (e.g. no model is promoted)."""
    return {"model_id": None, "rows": 0, "harmonized": 0, "warnings": [], "outputs": {},
            "skipped": reason}


def summary_markdown(summary: dict[str, dict[str, Any]]) -> str:
    """The flow's summary (``{"fit": Outcome.summary(), "apply": ...}``) as Markdown."""
    lines = []
    for step, s in summary.items():
        if s.get("skipped"):
            lines += [f"### {step}: nothing done", s["skipped"]]
            continue
        lines.append(f"### {step}: model `{s['model_id']}`, {s['harmonized']} of {s['rows']} scans")
        if s.get("promoted"):
            p = s["promoted"]
            lines.append(f"- the trial's promoted model, promoted {p['promoted_at']} by {p['actor']}")
        lines += [f"- {kind}: `{where}`" for kind, where in s["outputs"].items()]
        lines += [f"- warning: {w}" for w in s["warnings"]]
    return "\n".join(lines)


@task(name="extend-harmonization-model", cache_policy=NO_CACHE)
def extend_lake_task(lake: Lake, model: combat.ComBatModel, model_id: str, rows: pd.DataFrame,
                     covariates: pd.DataFrame, settings: HarmonizationSettings
                     ) -> tuple[combat.ComBatModel, str, Outcome | None]:
    """Prefect wrapper of :func:`extend_lake`."""
    return extend_lake(lake, model, model_id, rows, covariates, settings)


@task(name="fit-harmonization-model", cache_policy=NO_CACHE)
def fit_lake_task(lake: Lake, rows: pd.DataFrame, covariates: pd.DataFrame,
                  settings: HarmonizationSettings,
                  source: str = "lake biomarkers (reference set)") -> tuple[combat.ComBatModel, Outcome]:
    """Prefect wrapper of :func:`fit_lake`."""
    return fit_lake(lake, rows, covariates, settings, source)


# Neither is retried by Prefect: after a partial write (rows, then report and audit) a second
# attempt would find the rows done and skip the rest. They read through retried tasks.
@task(name="apply-harmonization-model", cache_policy=NO_CACHE)
def apply_lake_task(lake: Lake, model: combat.ComBatModel, model_id: str, rows: pd.DataFrame,
                    covariates: pd.DataFrame, settings: HarmonizationSettings,
                    only_new: bool = True) -> Outcome:
    """Prefect wrapper of :func:`apply_lake`."""
    return apply_lake(lake, model, model_id, rows, covariates, settings, only_new)
