"""The Study: one received study as the ``studies`` table holds it, and how to find one.

Intake writes a study's row once its files are de-identified and verified; every later stage
(BIDS, pipelines, QC, deviations and queries) reads the study back as this one value. It holds
only de-identified facts: the keyed study key, the trial subject label, the new StudyInstanceUID
and the shifted acquisition date.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import pandas as pd

from tasks.errors import CorelabError
from tasks.lake import tables
from tasks.lake.storage import Lake


class UnknownStudyError(CorelabError, KeyError):
    """No study (or more than one) of a site has the given key or key prefix."""

    code = "unknown_study"

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Study:
    """One received study (de-identified)."""

    trial_id: str
    site: str
    study_key: str              # sha256 of the sorted original SOPInstanceUIDs
    subject: str                # trial subject label
    session: str                # visit id (or an unscheduled session)
    study_uid: str              # de-identified StudyInstanceUID
    acquisition_date: date      # shifted
    days_from_baseline: int
    in_window: bool

    @classmethod
    def from_row(cls, row: pd.Series) -> "Study":
        """A Study from a ``studies`` table row (as read by ``read_table``, with its ``site``)."""
        return cls(str(row["trial_id"]), str(row["site"]), str(row["study_key"]), str(row["subject"]),
                   str(row["session"]), str(row["study_uid"]), pd.Timestamp(row["acquisition_date"]).date(),
                   int(row["days_from_baseline"]), bool(row["in_window"]))


def read_study(lake: Lake, site: str, study_key: str) -> Study:
    """The study of ``site`` whose key is (or starts with) ``study_key``."""
    studies = tables.read_table(lake, "studies", [site])
    hit = studies[studies.study_key.str.startswith(study_key)] if len(studies) else studies
    if len(hit) != 1:
        raise UnknownStudyError(f"study {study_key!r} is {'ambiguous' if len(hit) else 'not in'} "
                                f"the studies table of site {site}")
    return Study.from_row(hit.iloc[0])
