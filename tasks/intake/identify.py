"""Whose study it is: the trial subject of a site's PatientID, and the patient characteristics.

The subject comes from the site's roster, or is a keyed pseudonym of the
site's PatientID (HMAC-SHA256 with a key held only in an environment
variable). Which visit a study belongs to is a question of the visit schedule,
answered in :mod:`tasks.conformance.visits`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

from pydicom.dataset import Dataset

from data_contracts.trial import TrialConfig
from tasks.errors import CorelabError
from tasks.intake.placeholders import is_placeholder


class AttributionError(CorelabError, ValueError):
    """The study cannot be attributed to a trial subject or a visit: its files are quarantined."""

    code = "unattributable"


class SubjectError(AttributionError):
    """The study cannot be attributed to a trial subject."""


class StudyDateError(AttributionError):
    """The study carries no readable date, so its visit cannot be determined."""


def subject_label(trial: TrialConfig, site_id: str, patient_id: str | None) -> str:
    """The trial subject label of a site's PatientID.

    Raises
    ------
    SubjectError
        Empty PatientID, a placeholder PatientID (pseudonym mode), or one missing from the roster.
    """
    pid = (patient_id or "").strip()
    if not pid:
        raise SubjectError("PatientID (0010,0020) is empty: the study cannot be attributed to a subject")
    cfg = trial.subjects
    if cfg.mode == "pseudonym" and is_placeholder(pid):  # every such study would be one "subject"
        raise SubjectError("PatientID (0010,0020) is a placeholder (suppressed by the scanner or an upstream "
                           "tool): the study cannot be attributed to a subject; map it in the site's roster "
                           "or send the study with its PatientID")
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


# Where a study's date can come from, most trusted first: the study's own date, then dates every
# MR image carries (series, acquisition, content), then when the file itself was made.
DATE_SOURCES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime",
                "InstanceCreationDate")
RECEIPT = "receipt"


@dataclass(frozen=True)
class StudyDate:
    """A study's date, and where it came from (an element of :data:`DATE_SOURCES`, or ``receipt``)."""

    value: date
    source: str


def parse_date(value: object) -> date | None:
    """The date of a DA value (or the date part of a DT), or None when it holds no date."""
    text = str(value or "").strip()
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:  # "***", "00000000", a value in another format: not a date
        return None


def study_date(headers: Sequence[Dataset], received: date | None = None) -> StudyDate:
    """The study's date: the first readable one of :data:`DATE_SOURCES` in any of its files.

    Scanners that suppress dates write invalid values (``***``) in every date element; then, and
    only then, the day the upload arrived (``received``) stands in, and says so in ``source``.

    Raises
    ------
    StudyDateError
        No file holds a readable date, and no receipt date was given.
    """
    for kw in DATE_SOURCES:
        for h in headers:
            found = parse_date(h.get(kw))
            if found is not None:
                return StudyDate(found, kw)
    if received is not None:
        return StudyDate(received, RECEIPT)
    raise StudyDateError("the study has no readable StudyDate (0008,0020): its visit cannot be determined")


AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def patient_characteristics(header: Dataset, retained: bool) -> dict[str, object]:
    """Age (years), sex, weight (kg) and height (m) when the trial retains them."""
    if not retained:
        return {}
    get = header.get
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
