"""The virtual trial's planted truths, each checked against what corelab wrote to the lake.

Every check reads the lake's tables, the stored model and the harmonization report, never the
plan's own arrays: a truth holds only when corelab found it by itself. Subjects are matched
through the trial's pseudonym (:func:`tasks.intake.identify.subject_label`), as a monitor with
the key would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from rich.table import Table

from data_contracts.trial import TrialConfig
from flows.virtual.plan import CUT_SITE, UPGRADE_SITE, UPGRADED, Plan
from flows.virtual.scanner import AGE_REF, AGE_VOLUME_SLOPE
from harmonization import model_store
from harmonization.diagnostics import coefficients
from tasks.intake.identify import subject_label
from tasks.lake.storage import open_lake
from tasks.lake.tables import read_table
from tasks.report.status import LakeTables, latest_verdicts, scanner_epochs, visit_expectations

AGE_FEATURE = "TIV"             # the whole intracranial volume: what the age scaling acts on
COVERAGE = ("coverage", "fov_cut")   # the anat gate's metrics of a brain the field of view cuts


@dataclass(frozen=True)
class Truth:
    name: str
    holds: bool
    evidence: str


def truths_table(truths: list[Truth]) -> Table:
    t = Table(title="planted truths", show_lines=False)
    t.add_column("truth")
    t.add_column("result")
    t.add_column("evidence", overflow="fold")
    for x in truths:
        t.add_row(x.name, "[green]holds[/]" if x.holds else "[bold red]broken[/]", x.evidence)
    return t


def _subject(plan: Plan, trial: TrialConfig, key: str) -> tuple[str, str, str]:
    site, patient, visit = key.split("/")
    return site, subject_label(trial, site, patient), visit


def check_truths(plan: Plan, trial: TrialConfig, lake_url: str, harmonized: dict,
                 as_of: datetime) -> list[Truth]:
    lake = open_lake(lake_url)
    tables = LakeTables.read(lake, trial.trial_id)
    checks = (_upgrade, _coverage, _deviation, _missing, _site_effect, _age_effect)
    out = []
    for check in checks:
        try:
            out.append(check(plan, trial, lake, tables, harmonized, as_of))
        except Exception as exc:   # a truth that cannot be checked is broken, and says why
            out.append(Truth(check.__doc__.strip().splitlines()[0], False, f"could not check: {exc}"))
    return out


def _upgrade(plan, trial, lake, tables, harmonized, as_of) -> Truth:
    """site-b's software upgrade is a new scanner epoch and its own harmonization batch"""
    epochs = scanner_epochs(tables)
    mine = epochs[epochs["site"] == UPGRADE_SITE]
    model = model_store.load_model(lake, harmonized["fit"]["model_id"])
    batches = [b for b in model.batches if b.startswith(UPGRADE_SITE)]
    versions = sorted(mine["software_versions"].astype(str))
    holds = len(mine) == 2 and UPGRADED["software_versions"] in versions and len(batches) == 2
    return Truth(_upgrade.__doc__, holds,
                 f"{len(mine)} epochs at {UPGRADE_SITE} ({', '.join(versions)}); model batches "
                 f"{', '.join(batches) or 'none'}")


def _coverage(plan, trial, lake, tables, harmonized, as_of) -> Truth:
    """site-c's cut slabs FAIL QC on coverage and raise site queries"""
    cut = {(_subject(plan, trial, s.key)[1], s.visit) for s in plan.scans
           if s.site == CUT_SITE and s.scanner.slices_kept}
    qc = tables.qc[tables.qc["site"] == CUT_SITE]
    pair = list(zip(qc["subject"], qc["session"]))
    verdicts = latest_verdicts(qc)
    failed = {(s, v) for s, v, x in zip(verdicts["subject"], verdicts["session"], verdicts["verdict"]) if x == "FAIL"}
    on_coverage = {p for p, m, st in zip(pair, qc["metric"], qc["status"]) if m in COVERAGE and st == "FAIL"}
    d = tables.deviations
    qc_fail = d[(d["site"] == CUT_SITE) & (d["kind"] == "qc_fail")]["deviation_id"]
    q = tables.queries[tables.queries["deviation_id"].isin(qc_fail)]
    queried = {(s, v) for s, v in zip(q["subject"], q["session"])}           # the QC FAIL's own query
    others_failed = failed - cut
    holds = bool(cut) and cut <= failed & on_coverage and cut <= queried and not others_failed
    return Truth(_coverage.__doc__, holds,
                 f"{len(cut & failed & on_coverage)} of {len(cut)} cut series FAIL with coverage below its "
                 f"limit; {len(cut & queried)} have a QC FAIL site query; {len(others_failed)} other {CUT_SITE} "
                 "series FAIL")


def _deviation(plan, trial, lake, tables, harmonized, as_of) -> Truth:
    """the series acquired with flip angle 15 is a protocol deviation, and only it"""
    site, subject, visit = _subject(plan, trial, plan.deviation)
    d = tables.deviations
    fa = d[d["parameter"].astype(str).str.contains("flip_angle")]
    hit = fa[(fa["site"] == site) & (fa["subject"] == subject) & (fa["session"] == visit)]
    holds = len(hit) == 1 and len(fa) == 1
    return Truth(_deviation.__doc__, holds,
                 f"{len(fa)} flip-angle deviation(s); planted at {site} {subject} {visit}: "
                 + (f"{hit.iloc[0]['message']}" if len(hit) else "not found"))


def _missing(plan, trial, lake, tables, harmonized, as_of) -> Truth:
    """the visit never acquired is listed as missing and its query is overdue (escalated)"""
    site, subject, visit = _subject(plan, trial, plan.missing)
    exp = visit_expectations(trial, tables, pd.Timestamp(as_of))
    missing = exp[exp["state"] == "missing"]
    listed = {(r.site, r.subject, r.visit) for r in missing.itertuples()}
    d = tables.deviations
    dev = d[(d["kind"] == "missing_visit") & (d["subject"] == subject) & (d["session"] == visit)]
    q = tables.queries[tables.queries["deviation_id"].isin(dev["deviation_id"])]
    holds = listed == {(site, subject, visit)} and len(q) == 1 and q.iloc[0]["status"] == "escalated"
    status = q.iloc[0]["status"] if len(q) else "no query"
    return Truth(_missing.__doc__, holds,
                 f"missing: {', '.join('/'.join(x) for x in sorted(listed)) or 'none'}; "
                 f"planted {site}/{subject}/{visit}; its query: {status}")


def _fit_report(lake, harmonized) -> dict:
    path = harmonized["fit"]["outputs"]["report_json"]
    return json.loads(lake.read_text(path))


def _site_effect(plan, trial, lake, tables, harmonized, as_of) -> Truth:
    """the sites' scanner effects on the volumes are significant before ComBat and gone after"""
    diag = _fit_report(lake, harmonized)["diagnostics"]["site_effect"]
    before, after, n = diag["before"]["significant_F"], diag["after"]["significant_F"], diag["n_features"]
    holds = before > 0 and after == 0
    return Truth(_site_effect.__doc__, holds,
                 f"F-test, FDR 0.05: {before} of {n} features differ by batch before, {after} after")


def _age_effect(plan, trial, lake, tables, harmonized, as_of) -> Truth:
    """the planted age effect on volume is measured, and ComBat keeps it"""
    h = read_table(lake, "biomarkers_harmonized")
    h = h[(h["harmonization_model_id"] == harmonized["fit"]["model_id"]) & (h["trial_id"] == trial.trial_id)
          & (h["measure"] == AGE_FEATURE) & (h["session"] == plan.visits[0])].reset_index(drop=True)
    first = {_subject(plan, trial, s.key)[1]: s for s in plan.scans if s.visit == plan.visits[0]}
    x = pd.DataFrame({"AGE": h["subject"].map(lambda k: first[k].age),
                      "SEX": h["subject"].map(lambda k: float(first[k].person.sex == "F"))})

    def slope(column: str, batch: pd.Series | None) -> tuple[float, float, float]:
        """d V / d age over V at age 50 (V = V50 (1 + s (age - 50)) is linear in age), and its 95 % CI."""
        y = pd.DataFrame({AGE_FEATURE: h[column].to_numpy(dtype=float)})
        row = coefficients(y, x, batch).set_index("term").loc["AGE"]
        v50 = float(y[AGE_FEATURE].mean() + row["estimate"] * (AGE_REF - x["AGE"].mean()))
        return tuple(float(row[k]) / v50 for k in ("estimate", "ci_low", "ci_high"))

    raw = slope("value_raw", h["batch"])        # within each batch, before ComBat
    after = slope("value", None)                # harmonized: one population
    # measured: the planted slope inside the within-batch CI, and that CI excludes no effect at all;
    # kept: the harmonized estimate inside it, its own CI excluding 0 too
    measured = raw[1] <= AGE_VOLUME_SLOPE <= raw[2] and raw[2] < 0
    kept = raw[1] <= after[0] <= raw[2] and after[2] < 0
    return Truth(_age_effect.__doc__, measured and kept,
                 f"{AGE_FEATURE} at {plan.visits[0]} (n={len(h)}), slope / V(50) a year: planted "
                 f"{AGE_VOLUME_SLOPE:.4f}; before ComBat, within batch {raw[0]:.4f} [{raw[1]:.4f}, {raw[2]:.4f}]; "
                 f"after {after[0]:.4f} [{after[1]:.4f}, {after[2]:.4f}]")

