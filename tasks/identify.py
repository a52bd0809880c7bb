"""Who and when: the trial subject of a study and the visit it belongs to.

The subject comes from the site's roster, or is a keyed pseudonym of the
site's PatientID (HMAC-SHA256 with a key held only in an environment
variable). The visit comes from the study date's distance to the subject's
baseline, which is the subject's first study. Both dates are compared after
the same per-subject shift, so no real date is needed or stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import date

from data_contracts.trial import TrialConfig, Visit
from tasks.protocol import Finding


class SubjectError(ValueError):
    """The study cannot be attributed to a trial subject."""


def subject_label(trial: TrialConfig, site_id: str, patient_id: str | None) -> str:
    """The trial subject label of a site's PatientID.

    Raises
    ------
    SubjectError
        Empty PatientID, or a PatientID missing from the site's roster.
    """
    pid = (patient_id or "").strip()
    if not pid:
        raise SubjectError("PatientID (0010,0020) is empty: the study cannot be attributed to a subject")
    cfg = trial.subjects
    if cfg.mode == "roster":
        roster = cfg.roster.get(site_id, {})
        if pid not in roster:
            raise SubjectError(
                f"PatientID is not on the roster of site {site_id} "
                f"({len(roster)} subjects enrolled); add it to the trial file or correct the upload")
        return roster[pid]
    digest = hmac.new(trial.secret(cfg.secret_env), f"{trial.trial_id}|{site_id}|{pid}".encode(),
                      hashlib.sha256).digest()
    return cfg.prefix + base64.b32encode(digest[:5]).decode().rstrip("=")


@dataclass(frozen=True)
class VisitAssignment:
    session: str
    days_from_baseline: int
    in_window: bool
    findings: tuple[Finding, ...] = ()


def assign_visit(trial: TrialConfig, shifted_date: date, baseline: date | None,
                 sessions_taken: set[str]) -> VisitAssignment:
    """The visit of a study from its (shifted) date and the subject's (shifted) baseline.

    The first study of a subject is its baseline. A later study falls in the
    visit whose window contains it; otherwise it takes the nearest visit not yet
    used, flagged out of window, or an unscheduled session when none is left.
    """
    visits = trial.visits
    if baseline is None:
        return VisitAssignment(visits[0].id, 0, True)
    days = (shifted_date - baseline).days
    if days < 0:
        f = Finding(kind="out_of_window", severity="major", observed=f"day {days}",
                    expected=f"on or after baseline ({visits[0].id})",
                    message=f"study is {-days} days before the subject's baseline")
        return VisitAssignment(f"unsched{-days}before", days, False, (f,))
    for v in visits:
        if v.day - v.window_before <= days <= v.day + v.window_after and v.id not in sessions_taken:
            return VisitAssignment(v.id, days, True)
    free = [v for v in visits[1:] if v.id not in sessions_taken]
    if free:
        near: Visit = min(free, key=lambda v: abs(v.day - days))
        f = Finding(kind="out_of_window", severity="major", parameter="visit_day",
                    expected=f"day {near.day} (-{near.window_before}/+{near.window_after})",
                    observed=f"day {days}",
                    message=f"study on day {days} is outside the window of visit {near.id} "
                            f"(day {near.day}, -{near.window_before}/+{near.window_after} days)")
        return VisitAssignment(near.id, days, False, (f,))
    f = Finding(kind="unscheduled_visit", severity="minor", observed=f"day {days}",
                message=f"study on day {days} matches no remaining scheduled visit")
    return VisitAssignment(f"unsched{days}", days, False, (f,))


AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def patient_characteristics(header: object, retained: bool) -> dict[str, object]:
    """Age (years), sex, weight (kg) and height (m) when the trial retains them."""
    if not retained:
        return {}
    get = getattr(header, "get")
    age = str(get("PatientAge", "") or "").strip().upper()
    years = None
    # "000Y" is what scanners write when nobody entered an age: unknown, not a newborn
    if len(age) == 4 and age[:3].isdigit() and age[3] in AGE_UNITS and int(age[:3]) > 0:
        years = round(int(age[:3]) * AGE_UNITS[age[3]], 3)
    sex = str(get("PatientSex", "") or "").strip().upper()

    def num(kw: str) -> float | None:
        try:
            v = float(get(kw))
        except (TypeError, ValueError):
            return None
        return v if v > 0 else None

    return {"age_years": years, "sex": sex if sex in ("M", "F", "O") else None,
            "weight_kg": num("PatientWeight"), "height_m": num("PatientSize")}
