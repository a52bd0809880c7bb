"""Which visit of the schedule a study belongs to, and whether it is in its window.

The visit comes from the study date's distance to the subject's baseline, which
is the subject's first study. Both dates are compared after the same
per-subject shift, so no real date is needed or stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from data_contracts.trial import TrialConfig, Visit
from tasks.conformance.findings import Finding
from tasks.intake.identify import RECEIPT


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


def date_finding(source: str) -> Finding | None:
    """A deviation saying how sure a visit's date is, when it is not the study's own StudyDate.

    A date from another element of the images is as good as the scanner's clock (minor); the day
    the upload arrived can be days after the scan, so the site is asked to confirm it (major).
    Never the date itself: an original date is PHI.
    """
    if source == "StudyDate":
        return None
    if source == RECEIPT:
        return Finding(kind="study_date_substituted", severity="major", parameter="StudyDate",
                       expected="a date in StudyDate or another date element", observed=source,
                       message="no date element of the study holds a valid date (suppressed or invalid); its "
                               "visit was assigned from the day the upload arrived: confirm the scan date",
                       reason_code="date_unreadable")
    return Finding(kind="study_date_substituted", severity="minor", parameter="StudyDate",
                   expected="StudyDate", observed=source,
                   message=f"StudyDate (0008,0020) holds no valid date; the visit was assigned from {source}")
