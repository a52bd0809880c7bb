"""The state of a trial per site and visit, from the lake's Parquet tables only.

Everything here is a pure function of the tables (``studies``, ``series``, ``deviations``,
``queries``, ``qc``), the trial's visit schedule and the time ``as_of``; the site dashboard,
``corelab status`` and the nightly run show the same figures because they call the same code.

Clock: the tables keep study dates shifted per subject (de-identification), so a visit's window is
counted from the day the subject's baseline study was *received* (``studies.received_at``, real
time): visit ``v`` of a subject is expected once ``baseline + v.day - v.window_before`` has passed,
and missing once ``baseline + v.day + v.window_after`` has passed with no study of that session.
A site sends within days of the scan, so the window closes a few days late at most, never early.

Definitions (each shown on the dashboard beside its figure):
- deviation rate: studies with at least one protocol deviation / studies received;
- QC: each series' latest verdict per pipeline (after any reviewer override), PASS / WARN / FAIL;
- open queries: every query not resolved yet (open, answered by the site, escalated); its age in
  days since it was raised; overdue once past its due date (the trial's
  ``query_due_working_days``, Monday to Friday) or escalated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pandas as pd

from data_contracts.trial import TrialConfig
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.qc.queries import UNRESOLVED, due_date

TABLE_NAMES = ("studies", "series", "deviations", "queries", "qc")
VERDICTS = ("PASS", "WARN", "FAIL")


@dataclass(frozen=True)
class LakeTables:
    """The tables the trial's state is computed from (each with its ``site`` column)."""

    studies: pd.DataFrame
    series: pd.DataFrame
    deviations: pd.DataFrame
    queries: pd.DataFrame
    qc: pd.DataFrame

    @classmethod
    def read(cls, lake: Lake, trial_id: str | None = None) -> "LakeTables":
        """The tables of ``lake`` (of one trial's studies only, when a lake holds several)."""
        t = {name: read_table(lake, name) for name in TABLE_NAMES}
        if trial_id is not None:
            keys = set(t["studies"].loc[t["studies"]["trial_id"] == trial_id, "study_key"])
            t = {name: df[df["study_key"].isin(keys)].reset_index(drop=True) for name, df in t.items()}
        return cls(**t)


def utc(ts: datetime | pd.Timestamp | str | None = None) -> pd.Timestamp:
    """A timezone-aware UTC timestamp (now when ``ts`` is None)."""
    t = pd.Timestamp(ts if ts is not None else datetime.now(timezone.utc))
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _ts(col: pd.Series) -> pd.Series:
    return pd.to_datetime(col, utc=True)


def sites_of(trial: TrialConfig, tables: LakeTables) -> list[str]:
    """The trial's sites, then any site the tables hold that the trial no longer lists."""
    listed = [s.id for s in trial.sites]
    extra = sorted(set(tables.studies["site"]) - set(listed))
    return listed + extra


def latest_verdicts(qc: pd.DataFrame) -> pd.DataFrame:
    """One row per (series, pipeline): its latest verdict (overrides included)."""
    rows = qc[qc["metric"] == "verdict"]
    if rows.empty:
        return pd.DataFrame(columns=["site", "series_uid", "study_key", "subject", "session", "pipeline_name",
                                     "pipeline_version", "flow_run_id", "verdict", "created_at"])
    rows = rows.assign(created_at=_ts(rows["created_at"])).sort_values("created_at")
    return rows.drop_duplicates(["series_uid", "pipeline_name"], keep="last").reset_index(drop=True)


def visit_expectations(trial: TrialConfig, tables: LakeTables, as_of: pd.Timestamp) -> pd.DataFrame:
    """One row per (site, subject, visit): window opening and closing, received or not, state.

    ``state`` is ``received``, ``missing`` (window closed, nothing received), ``due`` (window
    open now) or ``future`` (window not open yet); ``scheduled_from`` is the key of the subject's
    first study, whose receipt starts its visit clock.
    """
    studies = tables.studies
    studies = studies[studies["status"] != "rejected"]    # nothing usable arrived: the visit is not received
    cols = ["site", "subject", "visit", "opens", "closes", "received", "state", "scheduled_from"]
    if studies.empty:
        return pd.DataFrame(columns=cols)
    studies = studies.assign(received_at=_ts(studies["received_at"]))
    first = studies.sort_values("received_at").drop_duplicates(["site", "subject"])
    baseline_id = trial.visits[0].id
    taken = set(zip(studies["site"], studies["subject"], studies["session"]))
    rows = []
    for site, subject, start, key in zip(first["site"], first["subject"], first["received_at"], first["study_key"]):
        for v in trial.visits:
            opens = start + timedelta(days=v.day - v.window_before)
            closes = start + timedelta(days=v.day + v.window_after)
            received = (site, subject, v.id) in taken or v.id == baseline_id
            state = ("received" if received else "missing" if as_of > closes
                     else "due" if as_of >= opens else "future")
            rows.append((site, subject, v.id, opens, closes, received, state, key))
    return pd.DataFrame(rows, columns=cols)


def visit_table(trial: TrialConfig, tables: LakeTables, as_of: pd.Timestamp) -> pd.DataFrame:
    """Per site and visit: expected (window opened by ``as_of``), received, missing, due."""
    exp = visit_expectations(trial, tables, as_of)
    out = []
    for site in sites_of(trial, tables):
        for v in trial.visits:
            e = exp[(exp["site"] == site) & (exp["visit"] == v.id)]
            expected = int((e["state"] != "future").sum())
            out.append({"site": site, "visit": v.id, "expected": expected,
                        "received": int((e["state"] == "received").sum()),
                        "missing": int((e["state"] == "missing").sum()),
                        "due": int((e["state"] == "due").sum())})
    return pd.DataFrame(out, columns=["site", "visit", "expected", "received", "missing", "due"])


def open_queries(tables: LakeTables, as_of: pd.Timestamp, working_days: int = 5) -> pd.DataFrame:
    """Unresolved queries, overdue (or escalated) first and oldest first, with age and due date."""
    q = tables.queries
    q = q[q["status"].isin(UNRESOLVED)]
    cols = ["site", "query_id", "subject", "session", "status", "age_days", "due", "overdue", "message", "answer"]
    if q.empty:
        return pd.DataFrame(columns=cols)
    created = _ts(q["created_at"])
    due = created.map(lambda t: due_date(t, working_days))
    age = (as_of - created).dt.total_seconds() / 86400
    q = q.assign(age_days=age.round(1), due=due, overdue=(as_of > due) | (q["status"] == "escalated"))
    return q.sort_values(["overdue", "age_days"], ascending=[False, False])[cols].reset_index(drop=True)


def site_table(trial: TrialConfig, tables: LakeTables, as_of: pd.Timestamp) -> pd.DataFrame:
    """One row per site: what arrived, how it fared, what is open (see the module's definitions)."""
    verdicts = latest_verdicts(tables.qc)
    queries = open_queries(tables, as_of, trial.query_due_working_days)
    visits = visit_table(trial, tables, as_of)
    studies = tables.studies
    rows = []
    for site in sites_of(trial, tables):
        st = studies[studies["site"] == site]
        n_studies = len(st)
        deviating = tables.deviations.loc[tables.deviations["site"] == site, "study_key"].nunique()
        v = verdicts[verdicts["site"] == site]["verdict"].value_counts()
        judged = int(sum(v.get(k, 0) for k in VERDICTS))
        q = queries[queries["site"] == site]
        vis = visits[visits["site"] == site]
        last = _ts(st["received_at"]).max() if n_studies else pd.NaT
        rows.append({
            "site": site, "subjects": int(st["subject"].nunique()), "studies": n_studies,
            "series": int((tables.series["site"] == site).sum()),
            "expected_visits": int(vis["expected"].sum()), "received_visits": int(vis["received"].sum()),
            "missing_visits": int(vis["missing"].sum()),
            "deviation_rate": deviating / n_studies if n_studies else float("nan"),
            **{f"qc_{k.lower()}": int(v.get(k, 0)) for k in VERDICTS},
            **{f"qc_{k.lower()}_rate": (int(v.get(k, 0)) / judged if judged else float("nan")) for k in VERDICTS},
            "open_queries": len(q), "overdue_queries": int(q["overdue"].sum()) if len(q) else 0,
            "oldest_query_days": float(q["age_days"].max()) if len(q) else float("nan"),
            "last_upload": last,
        })
    return pd.DataFrame(rows)


def scanner_epochs(tables: LakeTables) -> pd.DataFrame:
    """Per site and scanner epoch: the scanner, its software, and when its series arrived."""
    s = tables.series
    cols = ["site", "scanner_epoch", "manufacturer", "model", "software_versions", "first", "last", "series"]
    if s.empty:
        return pd.DataFrame(columns=cols)
    received = tables.studies[["study_key", "received_at"]].assign(received_at=lambda d: _ts(d["received_at"]))
    s = s.merge(received, on="study_key", how="left")
    g = s.groupby(["site", "scanner_epoch"], dropna=False)
    out = g.agg(manufacturer=("manufacturer", "first"), model=("model", "first"),
                software_versions=("software_versions", "first"), first=("received_at", "min"),
                last=("received_at", "max"), series=("series_uid", "count")).reset_index()
    return out.sort_values(["site", "first"])[cols].reset_index(drop=True)


def trial_totals(sites: pd.DataFrame) -> dict[str, float]:
    """Trial-wide totals of :func:`site_table` (rates recomputed from the counts)."""
    if sites.empty:
        return {}
    judged = sites[[f"qc_{k.lower()}" for k in VERDICTS]].to_numpy().sum()
    studies = sites["studies"].sum()
    dev = (sites["deviation_rate"].fillna(0) * sites["studies"]).sum()
    return {
        "sites": len(sites), "subjects": int(sites["subjects"].sum()), "studies": int(studies),
        "series": int(sites["series"].sum()), "expected_visits": int(sites["expected_visits"].sum()),
        "received_visits": int(sites["received_visits"].sum()), "missing_visits": int(sites["missing_visits"].sum()),
        "deviation_rate": dev / studies if studies else float("nan"),
        **{f"qc_{k.lower()}": int(sites[f"qc_{k.lower()}"].sum()) for k in VERDICTS},
        **{f"qc_{k.lower()}_rate": (sites[f"qc_{k.lower()}"].sum() / judged if judged else float("nan"))
           for k in VERDICTS},
        "open_queries": int(sites["open_queries"].sum()), "overdue_queries": int(sites["overdue_queries"].sum()),
    }
