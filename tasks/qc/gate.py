"""The per-site QC gate: PASS, WARN or FAIL with every reason.

Each metric is judged against the trial's rules (defaults, then per-site
overrides) and, once the site has enough scans, against the site's own
distribution (robust z-score from median and MAD, flagged only on the worse
side of a directional metric). The verdict is the worst metric's; a metric
that could not be computed is a FAIL that names it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_contracts.qc_settings import RobustZ, Rule, limit_code

ORDER = {"PASS": 0, "WARN": 1, "FAIL": 2}
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Unmeasured:
    """Why a metric could not be computed, and the reason code of that."""

    why: str
    code: str = "metric_missing"


@dataclass(frozen=True)
class MetricResult:
    metric: str
    value: float | None
    status: str                      # PASS | WARN | FAIL
    reason: str | None = None
    z: float | None = None
    code: str | None = None          # data_contracts.reasons, for a metric that is not PASS


@dataclass
class Verdict:
    status: str
    metrics: list[MetricResult] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [m.reason for m in self.metrics if m.reason]

    @property
    def reason_code(self) -> str | None:
        """The code of the first reason with the verdict's own status (None for a PASS); a
        ``not_a_head`` first of all, so the deviation and the site query say what matters most."""
        codes = [m.code for m in self.metrics if m.status == self.status and m.code]
        return "not_a_head" if "not_a_head" in codes else next(iter(codes), None)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def check_rule(metric: str, value: float, rule: Rule) -> tuple[str, str | None]:
    for status, below, above in (("FAIL", rule.fail_below, rule.fail_above),
                                 ("WARN", rule.warn_below, rule.warn_above)):
        if below is not None and value < below:
            return status, f"{metric} {_fmt(value)} is below the {status.lower()} limit {_fmt(below)}"
        if above is not None and value > above:
            return status, f"{metric} {_fmt(value)} is above the {status.lower()} limit {_fmt(above)}"
    return "PASS", None


def robust_z(value: float, history: Sequence[float]) -> float | None:
    """(value - median) / (1.4826 MAD) of the site's previous scans; None if MAD is 0."""
    h = np.asarray([x for x in history if x is not None and math.isfinite(x)], dtype=float)
    if h.size == 0:
        return None
    med = float(np.median(h))
    mad = float(np.median(np.abs(h - med))) * MAD_TO_SIGMA
    return (value - med) / mad if mad > 0 else None


def check_site(metric: str, value: float, rule: Rule, history: Sequence[float], cfg: RobustZ
               ) -> tuple[str, str | None, float | None]:
    if len(history) < cfg.min_n:
        return "PASS", None, None
    z = robust_z(value, history)
    if z is None:
        return "PASS", None, None
    worse = -z if rule.better == "higher" else z if rule.better == "lower" else abs(z)
    for status, limit in (("FAIL", cfg.fail), ("WARN", cfg.warn)):
        if worse > limit:
            return status, (f"{metric} {_fmt(value)} is {abs(z):.1f} robust SD from this site's "
                            f"median of {len(history)} scans (limit {limit:g})"), z
    return "PASS", None, z


def judge(metrics: Mapping[str, float | None], rules: Mapping[str, Rule],
          history: Mapping[str, Sequence[float]], cfg: RobustZ,
          missing: Mapping[str, Unmeasured] | None = None) -> Verdict:
    """The verdict of one series.

    Parameters
    ----------
    metrics
        Metric name -> value (None or NaN when it could not be computed).
    rules
        The rules that apply at this site (see ``QCSettings.rules_for``).
    history
        Metric name -> this site's earlier values (PASS and WARN scans only).
    missing
        Metric name -> why it could not be computed (reason text and code).
    """
    results = []
    for name in sorted(set(metrics) | set(missing or {})):
        value = metrics.get(name)
        if value is None or math.isnan(value):  # +inf is a value (FBER of a zero-filled background)
            gone = (missing or {}).get(name) or Unmeasured("is NaN" if value is not None else "is missing")
            results.append(MetricResult(name, None, "FAIL", f"{name} could not be computed: {gone.why}",
                                        code=gone.code))
            continue
        rule = rules.get(name)
        if rule is None:
            results.append(MetricResult(name, value, "PASS"))
            continue
        status, reason = check_rule(name, value, rule)
        code = limit_code(name) if reason else None
        if code == "not_a_head":
            reason = f"{reason}: the object may not be a T1-weighted head (or registration to the template failed)"
        z_status, z_reason, z = check_site(name, value, rule, history.get(name, ()), cfg)
        if ORDER[z_status] > ORDER[status]:
            status, reason, code = z_status, z_reason, "qc_site_outlier"
        results.append(MetricResult(name, value, status, reason, z, code))
    worst = max((r.status for r in results), key=ORDER.__getitem__, default="FAIL")
    if not results:
        results.append(MetricResult("metrics", None, "FAIL", "no QC metric could be computed",
                                    code="metric_missing"))
    return Verdict(worst, results)


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
