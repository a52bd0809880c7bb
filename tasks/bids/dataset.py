"""The BIDS dataset's own files: dataset_description.json, participants, sessions and scans tables.

They are rebuilt from the lake's ``studies`` table and the converted scans, so
they are always current and a rerun writes the same bytes.
"""

from __future__ import annotations

import io
import json

import pandas as pd

from data_contracts.bids import BIDS_VERSION
from data_contracts.trial import TrialConfig
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tasks.lake.versions import corelab_version, installed_version

PARTICIPANTS_JSON = {
    "participant_id": {"Description": "trial subject label (roster or keyed pseudonym)"},
    "site": {"Description": "trial site id"},
    "age": {"Description": "age at the baseline scan (DICOM PatientAge, retained)", "Units": "year"},
    "sex": {"Description": "DICOM PatientSex (retained)", "Levels": {"M": "male", "F": "female", "O": "other"}},
}


def _tsv(df: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    df.to_csv(buf, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return buf.getvalue().encode()


def write_if_changed(lake: Lake, rel: str, data: bytes) -> None:
    if not (lake.exists(rel) and lake.read_bytes(rel) == data):
        lake.write_bytes(rel, data)


def write_dataset_description(lake: Lake, trial: TrialConfig) -> None:
    desc = {
        "Name": trial.name or trial.trial_id,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [
            {"Name": "corelab", "Version": corelab_version(),
             "Description": "intake, PS3.15 Annex E de-identification, protocol conformance"},
            {"Name": "dcm2niix", "Version": installed_version("dcm2niix")},
        ],
    }
    write_if_changed(lake, "bids/dataset_description.json", json.dumps(desc, indent=2).encode())
    write_if_changed(lake, "bids/participants.json", json.dumps(PARTICIPANTS_JSON, indent=2).encode())
    write_if_changed(lake, "bids/sessions.json", json.dumps(SESSIONS_JSON, indent=2).encode())
    write_if_changed(lake, "bids/scans.json", json.dumps(SCANS_JSON, indent=2).encode())
    write_if_changed(lake, "bids/README", _readme(trial).encode())


def _readme(trial: TrialConfig) -> str:
    return (f"{trial.name or trial.trial_id}\n\nRaw BIDS dataset of trial {trial.trial_id}, written by corelab "
            "from the DICOM studies the sites sent: each study de-identified (DICOM PS3.15 Annex E), checked "
            "against the trial's protocol, and converted with dcm2niix. Subjects are trial pseudonyms, dates "
            "are shifted per subject; sessions.tsv and scans.tsv carry the shifted dates.\n")


def write_participants(lake: Lake, trial: TrialConfig) -> pd.DataFrame:
    studies = read_table(lake, "studies")
    studies = studies[studies["status"] != "rejected"]
    base = studies.sort_values(["subject", "days_from_baseline"]).drop_duplicates("subject")
    df = pd.DataFrame({
        "participant_id": "sub-" + base["subject"].astype(str),
        "site": base["site"].astype(str),
        "age": base["age_years"],
        "sex": base["sex"],
    }).sort_values("participant_id")
    write_if_changed(lake, "bids/participants.tsv", _tsv(df))
    return df


SESSIONS_JSON = {
    "acq_time": {"Description": "acquisition time of the session's first scan, on the trial's shifted "
                                "dates (n/a when no scan carries a time)"},
    "days_from_baseline": {"Description": "days from the subject's baseline scan to this session",
                           "Units": "day"},
}
SCANS_JSON = {
    "acq_time": {"Description": "acquisition time of the scan, on the trial's shifted dates "
                                "(n/a when the series carries no AcquisitionTime)"},
}


def write_sessions(lake: Lake, subject: str) -> None:
    """sessions.tsv of one subject; acq_time is the first scan's (from its scans.tsv), as BIDS wants a datetime."""
    studies = read_table(lake, "studies")
    mine = studies[(studies["subject"] == subject) & (studies["status"] != "rejected")]
    df = pd.DataFrame({
        "session_id": "ses-" + mine["session"].astype(str),
        "days_from_baseline": mine["days_from_baseline"],
    }).drop_duplicates("session_id").sort_values("session_id")
    df.insert(1, "acq_time", [_first_scan_time(lake, subject, s.removeprefix("ses-")) for s in df["session_id"]])
    write_if_changed(lake, f"bids/sub-{subject}/sub-{subject}_sessions.tsv", _tsv(df))


def _first_scan_time(lake: Lake, subject: str, session: str) -> str:
    rel = f"bids/sub-{subject}/ses-{session}/sub-{subject}_ses-{session}_scans.tsv"
    if not lake.exists(rel):
        return "n/a"
    times = pd.read_csv(io.BytesIO(lake.read_bytes(rel)), sep="\t", dtype=str)["acq_time"].dropna()
    times = sorted(t for t in times if "T" in t)
    return times[0] if times else "n/a"


def write_scans(lake: Lake, subject: str, session: str, acq_date: str) -> None:
    """scans.tsv of one session, from the images and sidecars present (acq_time on the shifted date)."""
    folder = f"bids/sub-{subject}/ses-{session}"
    rows = []
    for rel in lake.find(folder):
        if not rel.endswith(".nii.gz"):
            continue
        sidecar = json.loads(lake.read_text(rel[: -len(".nii.gz")] + ".json"))
        time = _hh_mm_ss(sidecar.get("AcquisitionTime"))
        rows.append({"filename": rel[len(folder) + 1:], "acq_time": f"{acq_date}T{time}" if time else "n/a"})
    df = pd.DataFrame(rows, columns=["filename", "acq_time"]).sort_values("filename")
    write_if_changed(lake, f"{folder}/sub-{subject}_ses-{session}_scans.tsv", _tsv(df))


def _hh_mm_ss(value: object) -> str | None:
    """``hh:mm:ss`` of a sidecar's AcquisitionTime (dcm2niix writes ``hh:mm:ss.ffffff``), else None."""
    text = str(value or "")[:8]
    parts = text.split(":")
    ok = len(parts) == 3 and all(len(p) == 2 and p.isdigit() for p in parts)
    return text if ok and int(parts[0]) < 24 and int(parts[1]) < 60 and int(parts[2]) < 61 else None
