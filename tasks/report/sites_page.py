"""The site dashboard: one self-contained HTML page (``reports/sites.html`` in the lake).

For data managers, monitors and sponsors: per site, expected versus received visits, protocol
deviation rate, QC verdict rates, open queries (overdue first), scanner epochs on a timeline and
missing visits, with trial-wide totals. Every figure comes from :mod:`tasks.report.status`, so it
equals the same question asked of the Parquet tables directly (tests/report checks it with duckdb).
The page holds its styles and its timeline (an inline SVG drawn with matplotlib): it opens from a
laptop's disk or a mail attachment without a server or a network.
"""

from __future__ import annotations

import html
import io
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
from jinja2 import Environment, select_autoescape

from data_contracts.trial import TrialConfig
from tasks.lake.storage import Lake
from tasks.report.status import (
    LakeTables,
    open_queries,
    scanner_epochs,
    site_table,
    trial_totals,
    utc,
    visit_expectations,
    visit_table,
)

PAGE = "reports/sites.html"


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f} %"


def _day(ts) -> str:
    return "–" if ts is None or pd.isna(ts) else pd.Timestamp(ts).strftime("%Y-%m-%d")


def epochs_svg(epochs: pd.DataFrame) -> str:
    """The scanner epochs of every site on one time axis, as an inline SVG ('' when none)."""
    if epochs.empty or epochs["first"].isna().all():
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    sites = list(dict.fromkeys(epochs["site"]))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(sites) + 1.0))
    colors = plt.get_cmap("tab10")
    for i, site in enumerate(sites):
        for j, (_, e) in enumerate(epochs[epochs["site"] == site].iterrows()):
            start, end = mdates.date2num(e["first"]), mdates.date2num(e["last"])
            width = max(end - start, 0.5)
            ax.barh(i, width, left=start, height=0.6, color=colors(j % 10), edgecolor="black", linewidth=0.5)
            ax.text(start, i + 0.38, f"{e['scanner_epoch']} ({e['series']})", fontsize=7, va="bottom")
    ax.set_yticks(range(len(sites)), sites)
    ax.invert_yaxis()
    ax.xaxis_date()
    ax.set_xlabel("received")
    ax.set_title("scanner epochs (a new epoch = a new scanner or software version)", fontsize=9)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


TEMPLATE = Path(__file__).with_name("sites.html.j2")   # the page, a Jinja2 template


def _num(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def render_sites_page(trial: TrialConfig, tables: LakeTables, as_of: datetime | None = None,
                      version: str = "", qc_pages: dict[str, str] | None = None) -> str:
    """The dashboard's HTML for the state of ``tables`` at ``as_of`` (now by default)."""
    now = utc(as_of)
    due = trial.query_due_working_days
    sites = site_table(trial, tables, now)
    visits = visit_table(trial, tables, now)
    exp = visit_expectations(trial, tables, now)
    epochs = scanner_epochs(tables)
    visit_ids = [v.id for v in trial.visits]
    visit_rows = [(site, [visits[(visits["site"] == site) & (visits["visit"] == v)].iloc[0].to_dict()
                          for v in visit_ids]) for site in sites["site"]] if len(sites) else []
    env = Environment(autoescape=select_autoescape(default=True))
    return env.from_string(TEMPLATE.read_text()).render(
        trial_id=trial.trial_id, as_of=now.strftime("%Y-%m-%d %H:%M UTC"), version=html.escape(version),
        totals=trial_totals(sites), sites=sites.to_dict("records"), visit_ids=visit_ids, visit_rows=visit_rows,
        queries=open_queries(tables, now, due).to_dict("records"),
        missing=exp[exp["state"] == "missing"].to_dict("records"), epochs=epochs.to_dict("records"),
        svg=epochs_svg(epochs), qc_pages=sorted((qc_pages or {}).items()), due_days=due,
        pct=_pct, day=_day, num=_num)


def write_sites_page(lake: Lake, trial: TrialConfig, as_of: datetime | None = None, version: str = "") -> str:
    """Render the dashboard from the lake's tables into ``reports/sites.html``; its lake path."""
    tables = LakeTables.read(lake, trial.trial_id)
    pages = {name.removesuffix(".html"): f"qc/{name}" for name in lake.listdir("reports/qc")
             if name.endswith(".html")}
    lake.write_bytes(PAGE, render_sites_page(trial, tables, as_of, version, pages).encode())
    return PAGE
