"""The harmonization report: one JSON of numbers, one self-contained HTML drawn from it.

:func:`fit_report`, :func:`apply_report` and :func:`refusal_report` assemble the
JSON (plain data: the model's metadata, every finding, the per-site table, the
before/after diagnostics of :mod:`harmonization.diagnostics`, ComBat's location
and scale estimates, the methods paragraph). :func:`render_html` turns that
JSON into HTML with the figures of :mod:`harmonization.figures` embedded as
base64 PNG, in the section order of ``report_spec.yaml``; a report can be
re-rendered from its JSON without recomputing anything.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import yaml

from data_contracts.harmonization_settings import HarmonizationSettings
from harmonization import combat, diagnostics, figures, validation
from harmonization.combat import ApplyResult, ComBatModel, FitResult
from harmonization.errors import Finding, HarmonizationRefused
from harmonization.inputs import HarmonizationData
from tasks.lake.storage import Lake
from tasks.lake.versions import software_versions

HERE = Path(__file__).resolve().parent
SCHEMA = "corelab.harmonization.report/1"
REFERENCES = [
    "Johnson WE, Li C, Rabinovic A. Adjusting batch effects in microarray expression data using "
    "empirical Bayes methods. Biostatistics 2007;8(1):118-127. doi:10.1093/biostatistics/kxj037",
    "Fortin J-P, et al. Harmonization of cortical thickness measurements across scanners and "
    "sites. NeuroImage 2018;167:104-120. doi:10.1016/j.neuroimage.2017.11.024",
    "Pomponio R, et al. Harmonization of large MRI datasets for the analysis of brain imaging "
    "patterns throughout the lifespan. NeuroImage 2020;208:116450. "
    "doi:10.1016/j.neuroimage.2019.116450",
    "Beer JC, et al. Longitudinal ComBat: a method for harmonizing longitudinal multi-scanner imaging "
    "data. NeuroImage 2020;220:117129. doi:10.1016/j.neuroimage.2020.117129",
    "Chen AA, et al. Mitigating site effects in covariance for machine learning in neuroimaging data. "
    "Hum Brain Mapp 2022;43(4):1179-1195. doi:10.1002/hbm.25688",
    "Leek JT, Johnson WE, Parker HS, Jaffe AE, Storey JD. The sva package for removing batch effects and "
    "other unwanted variation in high-throughput experiments. Bioinformatics 2012;28(6):882-883. "
    "doi:10.1093/bioinformatics/bts034",
    "Benjamini Y, Hochberg Y. Controlling the false discovery rate: a practical and powerful "
    "approach to multiple testing. J R Stat Soc B 1995;57(1):289-300. "
    "doi:10.1111/j.2517-6161.1995.tb02031.x",
]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _kinds(covariates: pd.DataFrame, names: list[str], categorical: list[str] = ()) -> list[dict[str, Any]]:
    """Numeric or categorical, as the model encodes it: a 1/2-coded SEX is counted by level, not
    shown as "1.2 +/- 0.4"."""
    return [{"name": n, "kind": "numeric" if pd.api.types.is_numeric_dtype(covariates[n])
             and not pd.api.types.is_bool_dtype(covariates[n]) and n not in categorical else "categorical"}
            for n in names if n in covariates.columns]


def _categorical(model: ComBatModel) -> list[str]:
    return [c.name for c in model.encoding.covariates if c.kind == "categorical"]


def _sites(covariates: pd.DataFrame, batch: pd.Series, kinds: list[dict[str, Any]]) -> dict:
    rows = diagnostics.site_table(covariates, batch, {k["name"]: k["kind"] for k in kinds})
    return {"rows": rows, "covariates": kinds}


def _model_section(model: ComBatModel, model_id: str) -> dict[str, Any]:
    meta = model.metadata
    keep = ("method", "batches", "batch_map", "features", "covariates", "settings", "input",
            "source", "created_at", "association_with_batch", "empirical_bayes", "options", "reference_batch",
            "parent", "extended_batches")
    return dict({k: meta[k] for k in keep if k in meta}, model_id=model_id)


def _location_scale(model: ComBatModel) -> dict[str, Any]:
    return {"batches": model.batches, "features": model.features,
            "gamma_star": model.gamma_star.round(6).tolist(),
            "delta_star": model.delta_star.round(6).tolist()}


def _reference_text(model: ComBatModel) -> str:
    if model.options.ref is None:
        return ""
    return f", with {model.batches[model.options.ref]} as reference batch (its values unchanged)"


def methods_text(model: ComBatModel) -> str:
    """The methods paragraph, from what the model records about its own fit."""
    meta = model.metadata
    s = meta.get("settings", {})
    covs = ", ".join(c["name"] for c in meta.get("covariates", []))
    nh = meta.get("software", {}).get("neuroHarmonize", "?")
    text = (f"{len(model.features)} features were harmonized across {len(model.batches)} batches "
            f"({'site and scanner epoch' if s.get('batch') == 'site_epoch' else 'site'}) with ComBat "
            f"(Johnson et al. 2007; Fortin et al. 2018) as implemented in neuroHarmonize {nh}, "
            f"{'with' if model.eb else 'without'} empirical Bayes"
            f"{' (non-parametric priors)' if model.eb and not model.options.parametric else ''}"
            f"{', adjusting site means only' if model.options.mean_only else ''}"
            f"{_reference_text(model)}"
            f", preserving {covs or 'no covariate'}. ")
    if meta.get("longitudinal"):
        text += (f"Subjects with repeated scans entered with a random intercept each (longitudinal ComBat, Beer et "
                 f"al. 2020; {len(meta['longitudinal']['subjects'])} subjects), estimated in closed form "
                 "(Swamy-Arora variance components, GLS fixed effects, BLUP intercepts): the batch scale acts on "
                 "each scan's residual, not on the subject's lasting difference. ")
    if meta.get("extended_batches"):
        text += (f"Batches {', '.join(meta['extended_batches'])} were added afterwards to model {meta.get('parent')} "
                 "without refitting it: their location and scale were estimated against its frozen grand mean, "
                 "pooled variance and covariate coefficients, with their own empirical-Bayes shrinkage, so no "
                 "value harmonized before changed. ")
    if model.covbat is not None:
        cb = meta.get("covbat", {})
        text += (f"The covariance of the features was then harmonized with CovBat (Chen et al. 2022): the "
                 f"{cb.get('components', '?')} principal components explaining {100 * cb.get('percent_var', 0):.0f} % "
                 "of the ComBat residuals' variance (features scaled to unit variance) had each batch's score mean "
                 "and variance removed (ComBat without covariates or empirical Bayes) before rotating back. ")
    if any(f.get("code") == "available_case" for f in meta.get("findings", [])):
        text += ("Missing values were left missing: each feature was harmonized on the scans that have it "
                 "(available-case ComBat, as sva's ComBat, Leek et al. 2012). ")
    if model.spline is not None:
        text += (f"{', '.join(model.spline.terms)} entered as penalised cubic B-splines "
                 f"(df {model.spline.df}; ComBat-GAM, Pomponio et al. 2020) with the penalty "
                 "weight of each feature chosen by 5-fold cross-validation; the spline fits were "
                 "computed for all features at once (corelab harmonization.gam), equal to "
                 "neuroHarmonize's per-feature GAMs for the same penalties. ")
    text += (f"The model was fitted on {meta.get('input', {}).get('rows', '?')} scans; batches "
             f"below {s.get('min_site_n')} scans were {'pooled' if s.get('small_site') == 'pool' else 'refused'}, "
             f"and a covariate associated with batch above {s.get('max_confounding')} "
             "(Cramér's V / eta) would have been refused. Site effects were tested per feature "
             "with an OLS F-test and a Kruskal-Wallis test, Benjamini-Hochberg adjusted "
             "(Benjamini & Hochberg 1995).")
    return text


def _base(title: str, kind: str, findings: list[Finding], data: HarmonizationData) -> dict:
    return {"schema": SCHEMA, "kind": kind, "title": title, "generated_at": _now(),
            "software": software_versions(), "findings": [f.to_dict() for f in findings],
            "data": {"rows": data.n, "features": data.features.shape[1], "source": data.source},
            "model": None, "diagnostics": None, "association": {}, "references": REFERENCES}


def fit_report(data: HarmonizationData, result: FitResult, model_id: str,
               title: str | None = None) -> dict[str, Any]:
    """Report of a fit: everything the issue's statisticians asked for."""
    model = result.model
    r = _base(title or f"Harmonization model {model_id}", "fit", result.findings, data)
    r["outcome"] = f"fitted {model.method} model {model_id}"
    r["model"] = _model_section(model, model_id)
    r["association"] = result.association
    r["sites"] = _sites(data.covariates, result.batch,
                        _kinds(data.covariates, model.encoding.names, _categorical(model)))
    r["location_scale"] = _location_scale(model)
    data, result, r["complete_rows"] = _complete_rows(data, result, len(model.encoding.columns))
    if data is not None:
        r["diagnostics"] = diagnostics.diagnose(data.features, result.harmonized, result.encoded,
                                                result.batch, _adjust_for(model, result.encoded))
        r["validation"] = _validation(data, result)
    r["penalties"] = _penalties(model)
    r["methods"] = methods_text(model)
    _name_levels(r, model)
    return r


def _name_levels(r: dict[str, Any], model: ComBatModel) -> None:
    """Coded levels by their names (``covariate_levels``): the site table and its figure, the
    biological terms ("SEX=female", not "SEX=2") and the covariates of the summary."""
    levels = model.metadata.get("settings", {}).get("covariate_levels") or {}
    if not levels:
        return

    def term(text: str) -> str:
        name, _, code = str(text).partition("=")
        return f"{name}={levels[name].get(code, code)}" if name in levels and code else text

    for row in (r.get("sites") or {}).get("rows", []):
        for name, names in levels.items():
            if isinstance(row.get(name), dict):
                row[name] = {names.get(k, k): n for k, n in row[name].items()}
    for part in ("survival", "before", "after"):
        for record in ((r.get("diagnostics") or {}).get("biology") or {}).get(part, []):
            if "term" in record:
                record["term"] = term(record["term"])
    if r.get("model") and r["model"].get("covariates"):
        r["model"]["covariates"] = [dict(c, level_names=[levels[c["name"]].get(v, v) for v in c.get("levels", [])])
                                    if c.get("name") in levels else c for c in r["model"]["covariates"]]


def _complete_rows(data: HarmonizationData, result: FitResult, n_covariates: int
                   ) -> tuple[HarmonizationData | None, FitResult | None, dict[str, Any] | None]:
    """The fitted rows the diagnostics can use: with missing values (available-case ComBat), the
    rows complete in every feature (the tests and the multivariate checks need whole rows), said in
    the report; none when those are too few to test a site effect."""
    complete = data.features.notna().all(axis=1).to_numpy()
    if complete.all():
        return data, result, None
    batch = result.batch[complete]
    enough = (batch.nunique() >= 2 and batch.value_counts().min() >= 2
              and complete.sum() > batch.nunique() + n_covariates + 1)
    said = {"rows": int(complete.sum()), "of": data.n, "diagnosed": bool(enough)}
    if not enough:
        return None, None, said
    sub = data.subset(complete)
    return sub, replace(result, harmonized=result.harmonized[complete], batch=batch,
                        encoded=result.encoded[complete]), said


def _validation(data: HarmonizationData, result: FitResult) -> dict[str, Any]:
    """Held-out site effect, scale, multivariate site signal, EB priors, covariate balance."""
    model = result.model
    settings = HarmonizationSettings(**model.metadata.get("settings", {}))
    priors = validation.prior_fit(model)
    fitted = data.subset(np.ones(data.n, bool))
    fitted.batch = result.batch
    return {
        "held_out": validation.held_out(fitted, settings, result.encoded),
        "scale": {"before": validation.scale_effect(data.features, result.encoded, result.batch),
                  "after": validation.scale_effect(result.harmonized, result.encoded, result.batch)},
        "site_prediction": {"before": validation.site_prediction(data.features, result.encoded, result.batch),
                            "after": validation.site_prediction(result.harmonized, result.encoded, result.batch)},
        "priors": priors,
        "prior_panels": validation.prior_panels(model, priors) if model.eb else [],
        "balance": validation.covariate_balance(data.covariates, model.encoding, result.batch),
        "covariance": validation.covariance(data, result),
        "outliers": combat.outlier_effect(result, data, settings),
    }


def apply_report(model: ComBatModel, model_id: str, data: HarmonizationData, result: ApplyResult,
                 title: str | None = None) -> dict[str, Any]:
    """Report of applying a frozen model: the same before/after checks on the new rows."""
    r = _base(title or f"Frozen model {model_id} applied", "apply", result.findings, data)
    ok = result.ok
    r["outcome"] = f"{int(ok.sum())} of {data.n} rows harmonized with frozen model {model_id}"
    r["model"] = _model_section(model, model_id)
    r["apply"] = {"rows": data.n, "harmonized": int(ok.sum()),
                  "not_harmonized": dict(Counter(result.status[~ok]))}
    sub = data.subset(ok)
    batch = result.batch[ok]
    if ok.any():
        r["sites"] = _sites(sub.covariates, batch, _kinds(sub.covariates, model.encoding.names, _categorical(model)))
    whole = ok & result.harmonized.notna().all(axis=1).to_numpy()   # available-case: tests need whole rows
    if not whole[ok].all():
        r["complete_rows"] = {"rows": int(whole.sum()), "of": int(ok.sum()), "diagnosed": True}
        sub, batch = data.subset(whole), result.batch[whole]
    if batch.nunique() >= 2 and whole.sum() > batch.nunique() + len(model.encoding.columns) + 1:
        encoded, _ = model.encoding.encode(sub.covariates)
        r["diagnostics"] = diagnostics.diagnose(sub.features[model.features],
                                                result.harmonized[whole], encoded, batch,
                                                _adjust_for(model, encoded))
    elif "complete_rows" in r:
        r["complete_rows"]["diagnosed"] = False
    r["location_scale"] = _location_scale(model)
    r["methods"] = methods_text(model)
    _name_levels(r, model)
    return r


def extend_report(model: ComBatModel, model_id: str, data: HarmonizationData, result: ApplyResult,
                  estimated: dict[str, int]) -> dict[str, Any]:
    """Report of an extension: the apply report of the child model, saying which batches were estimated."""
    r = apply_report(model, model_id, data, result,
                     title=f"Model {model.metadata.get('parent')} extended with {', '.join(estimated)} as {model_id}")
    r["kind"] = "extend"
    r["outcome"] = (f"batches {', '.join(f'{b} ({n} rows)' for b, n in estimated.items())} estimated against the "
                    f"frozen model {model.metadata.get('parent')}; " + r["outcome"])
    return r


def refusal_report(data: HarmonizationData, covariates: list[str], error: HarmonizationRefused,
                   title: str | None = None) -> dict[str, Any]:
    """Report of a refused fit: what was seen, and every reason it was refused."""
    r = _base(title or "Harmonization refused", "refused", error.findings, data)
    n = len([f for f in error.findings if f.level == "refusal"])
    r["outcome"] = f"refused ({n} reason{'s' if n != 1 else ''}); nothing was harmonized"
    if data.batch.notna().all():
        r["sites"] = _sites(data.covariates, data.batch, _kinds(data.covariates, covariates))
    r["association"] = {f.where["covariate"]: round(v, 4) for f in error.findings
                        for k, v in f.where.items() if k in ("eta", "Cramér's V")}
    r["methods"] = "No model was fitted."
    return r


def _adjust_for(model: ComBatModel, encoded: pd.DataFrame) -> pd.DataFrame | None:
    """A ComBat-GAM model's covariate design (spline basis included) for the site tests."""
    if model.spline is None:
        return None
    return pd.DataFrame(combat.covariate_design(model, encoded), index=encoded.index)


def _penalties(model: ComBatModel) -> dict[str, Any] | None:
    if model.alphas is None:
        return None
    labels = ["/".join(f"{a:g}" for a in row) for row in model.alphas]
    return {"terms": list(model.spline.terms), "per_feature": dict(zip(model.features, labels)),
            "counts": dict(sorted(Counter(labels).items(), key=lambda kv: float(kv[0].split("/")[0])))}


def _num(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f} %"


def render_html(report: dict[str, Any]) -> str:
    """Self-contained HTML of a report dict (figures drawn here, from the dict)."""
    spec = yaml.safe_load((HERE / "report_spec.yaml").read_text(encoding="utf-8"))
    d = report.get("diagnostics")
    fig: dict[str, str] = {}
    if report.get("sites"):
        fig["sites"] = figures.sites(report["sites"]["rows"], report["sites"]["covariates"])
    if d:
        fig["site_effect"] = figures.site_effect(d["site_effect"]["per_feature"], d["alpha"])
        if d["biology"]["before"]:     # none without covariates
            fig["biology"] = figures.biology(d["biology"]["before"], d["biology"]["after"])
        fig["boxplots"] = figures.boxplots(d["boxplots"])
        fig["pca"] = figures.pca(d["pca"])
    if report.get("location_scale"):
        fig["location_scale"] = figures.location_scale(report["location_scale"])
    if (report.get("validation") or {}).get("prior_panels"):
        fig["priors"] = figures.priors(report["validation"]["prior_panels"])
    has = {"summary": True, "findings": bool(report["findings"]), "sites": "sites" in fig,
           "site_effect": bool(d), "biology": "biology" in fig, "boxplots": bool(d), "pca": bool(d),
           "location_scale": "location_scale" in fig, "validation": bool(report.get("validation")),
           "penalties": bool(report.get("penalties")),
           "apply": bool(report.get("apply")), "methods": True}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), autoescape=True)
    env.filters["num"] = _num
    return env.get_template("report.html.j2").render(r=report, spec=spec, has=has, fig=fig,
                                                     pct=_pct)


def to_json(report: dict[str, Any]) -> str:
    """Strict JSON: a statistic that could not be computed is null, never NaN."""
    return json.dumps(_finite(report), indent=1, default=str, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(report: dict[str, Any], html_path: str | Path) -> tuple[Path, Path]:
    """Write ``X.html`` and its ``X.json`` next to it; returns both paths."""
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    json_path = html_path.with_suffix(".json")
    json_path.write_text(to_json(report), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return html_path, json_path


def save_report(lake: Lake, report: dict[str, Any], name: str) -> tuple[str, str]:
    """Store ``reports/harmonization/<name>.html`` and ``.json`` in the lake."""
    base = f"reports/harmonization/{name}"
    lake.write_text(base + ".json", to_json(report))
    lake.write_text(base + ".html", render_html(report))
    return base + ".html", base + ".json"
