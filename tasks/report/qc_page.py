"""QC review pages: one self-contained HTML page per processed series (``reports/qc/<series>.html``).

A reviewer decides from it, as from MRIQC's and fMRIPrep's reports: mosaics of the pipeline's
image with the brain mask's outline and the tissue segmentation over it (nilearn's plotting, the
figures those reports are built from), each quality metric against the same metric of the site's
and the trial's other series (median and interquartile range, the series' rank, and one strip
plot of all of them), the gate's reasons, the provenance (input sha256, backend and image digest or
environment hash, flow run), and the exact ``corelab qc override`` command that records a decision.

Images are PNGs embedded as data URIs: the page opens from disk, without a server or a network.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, select_autoescape

from pipelines.registry import UnknownPipeline, get_spec
from tasks.bids.convert import existing_images
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.report.status import latest_verdicts
from tasks.run.derivatives import derivatives_root, image_entities, lake_outputs

TEMPLATE = Path(__file__).with_name("qc.html.j2")
ROOT = "reports/qc"
INDEX = f"{ROOT}/index.json"     # series -> stamp of the verdicts its page shows
log = logging.getLogger("corelab.report")


class QCPageError(ValueError):
    """No processed series by that name, or more than one."""


@dataclass(frozen=True)
class Judged:
    """One series' latest judgement by one pipeline version: its qc rows."""

    site: str
    series_uid: str
    pipeline: str
    version: str
    rows: pd.DataFrame          # every metric row of that run, the verdict row included

    @property
    def verdict(self) -> pd.Series:
        return self.rows[self.rows["metric"] == "verdict"].iloc[0]


def page_path(series_uid: str) -> str:
    return f"{ROOT}/{series_uid}.html"


def latest_runs(qc: pd.DataFrame) -> pd.DataFrame:
    """Every row of each (series, pipeline)'s latest run: the flow run of its newest verdict."""
    if qc.empty:
        return qc
    keys = ["series_uid", "pipeline_name", "pipeline_version", "flow_run_id"]
    return qc.merge(latest_verdicts(qc)[keys], on=keys)


def judged_series(runs: pd.DataFrame, series: str | None = None) -> list[Judged]:
    """The latest judgement of every processed series (or of those ``series`` is a prefix of),
    from :func:`latest_runs`."""
    if runs.empty:
        return []
    if series:
        runs = runs[runs["series_uid"].str.startswith(series)]
    out = []
    for (uid, pipeline, version), rows in runs.groupby(["series_uid", "pipeline_name", "pipeline_version"]):
        out.append(Judged(str(rows["site"].iloc[0]), str(uid), str(pipeline), str(version),
                          rows.reset_index(drop=True)))
    return sorted(out, key=lambda j: (j.site, j.series_uid, j.pipeline))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, facecolor=fig.get_facecolor())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mosaics(lake: Lake, j: Judged) -> list[tuple[str, str]]:
    """(caption, PNG data URI) of the pipeline's image with the mask and segmentation over it."""
    try:
        spec = replace(get_spec(j.pipeline), version=j.version)   # the derivatives of the judged version
    except UnknownPipeline:
        return []
    subject, session = str(j.verdict["subject"]), str(j.verdict["session"])
    image = existing_images(lake, subject, session).get(j.series_uid)
    if image is None:
        return []
    with tempfile.TemporaryDirectory(prefix="corelab-qc-page-") as tmp:   # nibabel reads local files
        outputs = {k: lake.local_file(v, tmp) for k, v in
                   lake_outputs(spec, subject, session, image_entities(image)).items()
                   if k in ("preproc", "brain_mask", "dseg") and lake.exists(v)}
        background = outputs.get("preproc") or lake.local_file(image, tmp)
        return _mosaics(lake, spec, outputs, background)


def _mosaics(lake: Lake, spec, outputs: dict[str, str], background: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    out = []
    for mode, cuts in (("z", 8), ("x", 6)):
        fig = plt.figure(figsize=(12, 2.6), facecolor="black")
        display = plotting.plot_anat(background, display_mode=mode, cut_coords=cuts, figure=fig,
                                     dim=-0.3, annotate=False, draw_cross=False, colorbar=False)
        if "brain_mask" in outputs:
            display.add_contours(outputs["brain_mask"], levels=[0.5], colors="r", linewidths=1.0)
        out.append((f"{'axial' if mode == 'z' else 'sagittal'}: the image with the brain mask's outline (red)",
                    _png(fig)))
        plt.close(fig)
    if "dseg" in outputs:
        from matplotlib.colors import ListedColormap

        labels = _dseg_labels(lake, spec)
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"][:max(len(labels), 1)]
        fig = plt.figure(figsize=(12, 2.6), facecolor="black")
        plotting.plot_roi(outputs["dseg"], bg_img=background, display_mode="z", cut_coords=8, figure=fig,
                          alpha=0.45, cmap=ListedColormap(colors), vmin=0.5, vmax=len(colors) + 0.5, dim=-0.3,
                          annotate=False, draw_cross=False, colorbar=False)
        legend = ", ".join(f"{name} {color.removeprefix('tab:')}" for name, color in zip(labels, colors))
        out.append((f"axial: the tissue segmentation over the image ({legend or 'labels 1, 2, 3'})", _png(fig)))
        plt.close(fig)
    return out


def _dseg_labels(lake: Lake, spec) -> list[str]:
    """The segmentation's label names in index order, from the derivative dataset's dseg.tsv."""
    rel = f"{derivatives_root(spec)}/dseg.tsv"
    if not lake.exists(rel):
        return []
    table = pd.read_csv(io.StringIO(lake.read_text(rel)), sep="\t")
    if "index" not in table.columns:
        return []
    names = table["abbreviation"] if "abbreviation" in table.columns else table.get("name")
    return [] if names is None else [str(a) for a in names[table["index"].argsort()]]


def _finite(values: pd.Series) -> pd.Series:
    v = values.astype(float)
    return v[np.isfinite(v)]


def metric_context(runs: pd.DataFrame, j: Judged) -> pd.DataFrame:
    """Each metric of ``j`` beside the site's and the trial's values of the same pipeline
    (``runs``: :func:`latest_runs`)."""
    runs = runs[(runs["pipeline_name"] == j.pipeline) & (runs["metric"] != "verdict")]
    rows = []
    for r in j.rows[j.rows["metric"] != "verdict"].sort_values("metric").itertuples():
        # finite values only: a ratio over an empty background (fber) can be infinite
        trial = _finite(runs.loc[runs["metric"] == r.metric, "value"])
        site = _finite(runs.loc[(runs["metric"] == r.metric) & (runs["site"] == j.site), "value"])
        rank = float((trial < r.value).mean() * 100) if len(trial) > 1 and pd.notna(r.value) else float("nan")
        rows.append({"metric": r.metric, "value": r.value, "status": r.status, "reason": r.reason or "",
                     "robust_z": r.robust_z,
                     "site_n": len(site), "site_median": site.median(), "site_q1": site.quantile(0.25),
                     "site_q3": site.quantile(0.75),
                     "trial_n": len(trial), "trial_median": trial.median(), "trial_q1": trial.quantile(0.25),
                     "trial_q3": trial.quantile(0.75), "trial_rank": rank})
    return pd.DataFrame(rows)


def strip_plot(runs: pd.DataFrame, j: Judged) -> str:
    """Every metric on one figure: the trial's series (grey), the site's (blue), this one (red),
    each metric scaled by the trial's median and IQR so they share an axis; '' when none."""
    runs = runs[(runs["pipeline_name"] == j.pipeline) & (runs["metric"] != "verdict")]
    runs = runs[np.isfinite(runs["value"].astype(float))]
    metrics = sorted(set(j.rows.loc[j.rows["metric"] != "verdict", "metric"]))
    if not metrics or runs.empty:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.32 * len(metrics) + 1))
    for i, m in enumerate(metrics):
        vals = runs[runs["metric"] == m]
        med = vals["value"].median()
        iqr = vals["value"].quantile(0.75) - vals["value"].quantile(0.25)
        scale = iqr if iqr > 0 else (abs(med) if med else 1.0)
        z = (vals["value"] - med) / scale
        ax.scatter(z, [i] * len(z), s=12, c=["tab:blue" if s == j.site else "0.7" for s in vals["site"]], zorder=2)
        mine = vals[vals["series_uid"] == j.series_uid]["value"]
        if len(mine):
            ax.scatter((mine - med) / scale, [i] * len(mine), s=60, c="red", marker="D", zorder=3)
    ax.set_yticks(range(len(metrics)), metrics)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("(value - trial median) / trial IQR")
    ax.set_title("this series (red) among the site's (blue) and the trial's (grey) series", fontsize=9)
    fig.tight_layout()
    uri = _png(fig)
    plt.close(fig)
    return uri


def override_command(j: Judged) -> str:
    flip = "fail" if j.verdict["verdict"] != "FAIL" else "pass"
    return f'corelab qc override {j.series_uid} --pipeline {j.pipeline} --verdict {flip} --reason "<what you saw>"'


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and pd.isna(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def section(lake: Lake, runs: pd.DataFrame, j: Judged) -> dict:
    """What the page shows of one pipeline's judgement of the series."""
    v = j.verdict
    provenance = [("series", j.series_uid), ("site", j.site),
                  ("subject / session", f"{v['subject']} / {v['session']}"),
                  ("pipeline", f"{j.pipeline} {j.version}"), ("backend", _fmt(v.get("backend"))),
                  ("image digest", _fmt(v.get("container_digest"))),
                  ("environment sha256", _fmt(v.get("environment_sha256"))),
                  ("input sha256", _fmt(v.get("input_sha256"))), ("flow run", _fmt(v.get("flow_run_id"))),
                  ("judged at", _fmt(v.get("created_at")))]
    return {"j": j, "verdict": v, "provenance": provenance,
            "metrics": metric_context(runs, j).to_dict("records"),
            "reasons": j.rows[(j.rows["metric"] != "verdict") & (j.rows["status"] != "PASS")].to_dict("records"),
            "mosaics": mosaics(lake, j), "strip": strip_plot(runs, j), "command": override_command(j),
            "overridden": bool(v.get("override_by")) and pd.notna(v.get("override_by"))}


def render_qc_page(lake: Lake, runs: pd.DataFrame, judged: list[Judged], version: str = "") -> str:
    """The page of one series: a section per pipeline that judged it."""
    env = Environment(autoescape=select_autoescape(default=True))
    return env.from_string(TEMPLATE.read_text()).render(
        series_uid=judged[0].series_uid, site=judged[0].site, version=version,
        sections=[section(lake, runs, j) for j in judged], fmt=_fmt)


def _stamp(judged: list[Judged]) -> str:
    """What a page shows changes only with these: each verdict row's pipeline, version, verdict and times."""
    parts = []
    for j in judged:
        v = j.verdict
        parts.append("|".join(str(v.get(k)) for k in ("pipeline_name", "pipeline_version", "verdict", "created_at",
                                                      "override_by", "override_at")))
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


def write_qc_pages(lake: Lake, series: str | None = None, version: str = "", only_changed: bool = False) -> list[str]:
    """Write the page of every processed series (or those ``series`` is a prefix of); their lake paths.

    ``only_changed``: only series whose verdicts changed since their page was written (new, re-judged
    or overridden; what the nightly run refreshes). A series whose page cannot be made is logged and
    skipped: the others are still written.
    """
    runs = latest_runs(read_table(lake, "qc"))     # once: every page compares against the same runs
    judged = judged_series(runs, series)
    if series and not judged:
        raise QCPageError(f"no processed series {series!r} in the qc table (`corelab qc override` takes the same "
                          "SeriesInstanceUID or a prefix of it)")
    by_series: dict[str, list[Judged]] = {}
    for j in judged:
        by_series.setdefault(j.series_uid, []).append(j)
    index = json.loads(lake.read_text(INDEX)) if lake.exists(INDEX) else {}
    written = []
    for uid, js in by_series.items():
        stamp = _stamp(js)
        if only_changed and index.get(uid) == stamp and lake.exists(page_path(uid)):
            continue
        try:
            html = render_qc_page(lake, runs, js, version)
        except Exception:  # one series' files (a missing or unreadable image) must not cost the others theirs
            log.exception("the QC page of series %s could not be made", uid)
            continue
        lake.write_bytes(page_path(uid), html.encode())
        index[uid] = stamp
        written.append(page_path(uid))
    if written:
        lake.write_bytes(INDEX, json.dumps(index, sort_keys=True, indent=0).encode())
    return written
