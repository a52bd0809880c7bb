"""Protocol conformance on real series: injected violations give exactly the expected deviations."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from data_contracts.trial import load_trial
from tasks.conformance.protocol import check_scanner
from tasks.conformance.visits import assign_visit
from tasks.intake.identify import SubjectError, subject_label
from tasks.intake.inventory import inventory_upload
from tasks.lake.storage import Lake
from tasks.receive.study import Upload, receive_one_study
from tests.data import shared_path
from tests.helpers import DEMO_TRIAL, GE_SERIES


def _trial(tmp_path: Path, *edits: tuple[str, str]):
    text = DEMO_TRIAL.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    p = tmp_path / "trial.yaml"
    p.write_text(text)
    return load_trial(p)


def _receive(tmp_path, trial, site="ge-nih", parts=GE_SERIES):
    lake = Lake(str(tmp_path / "lake")).init()
    files = inventory_upload(shared_path(*parts)).accepted
    return receive_one_study(Upload(trial, site, "u", lake), files)


def test_injected_tr_violation_gives_exactly_one_deviation(tmp_path):
    trial = _trial(tmp_path, ("repetition_time: {value: 5000, abs: 50}", "repetition_time: {value: 4000, abs: 50}"))
    o = _receive(tmp_path, trial)
    (s,) = o.series
    assert s.series_type == "bold" and s.verdict == "deviation"
    (f,) = o.all_findings
    assert (f.kind, f.parameter, f.severity) == ("parameter", "repetition_time", "major")
    assert (f.expected, f.observed) == ("4000 ± 50 ms", "5000 ms")
    assert f.series_key == s.series_uid


def test_conforming_series_has_no_deviation(tmp_path):
    o = _receive(tmp_path, load_trial(DEMO_TRIAL))
    assert [s.verdict for s in o.series] == ["conform"] and o.all_findings == []
    assert o.status == "accepted"


def test_software_upgrade_is_a_new_scanner_epoch(tmp_path):
    trial = _trial(tmp_path, ('software_versions: ["27\\\\LX\\\\MR Software release:DV26.0_R01_1725.a"]',
                              'software_versions: ["27\\\\LX\\\\MR Software release:DV25.1"]'))
    o = _receive(tmp_path, trial)
    (f,) = o.all_findings
    assert f.kind == "new_scanner_epoch" and f.expected == "27\\LX\\MR Software release:DV25.1"
    assert o.series[0].scanner_epoch.startswith("E") and o.series[0].scanner_epoch in f.message


def test_unknown_scanner(tmp_path):
    site = load_trial(DEMO_TRIAL).site("siemens-trio")
    identity = {"manufacturer": "GE MEDICAL SYSTEMS", "model": "SIGNA Premier", "device_serial": "X1",
                "software_versions": "30"}
    epoch, (f,) = check_scanner(site, identity)
    assert f.kind == "unknown_scanner" and "SIGNA Premier" in f.message and epoch.startswith("E")
    epoch2, findings = check_scanner(site, {"manufacturer": "SIEMENS", "model": "TrioTim",
                                            "device_serial": "35131", "software_versions": "syngo MR B17"})
    assert findings == [] and epoch2 != epoch


def test_missing_required_series(tmp_path):
    t1_sites = "[philips-ingenia, siemens-xa30]"
    with_ge = "[philips-ingenia, siemens-xa30, ge-nih]"
    trial = _trial(tmp_path, (f"required: {{visits: [baseline], sites: {t1_sites}}}\n      sites: {t1_sites}",
                              f"required: {{visits: [baseline], sites: {with_ge}}}\n      sites: {with_ge}"))
    o = _receive(tmp_path, trial)
    (f,) = o.all_findings
    assert f.kind == "missing_series" and f.expected == "T1w" and "visit baseline" in f.message


def test_unclassified_and_ambiguous_series(tmp_path):
    trial = _trial(tmp_path, ('description: ["*epi*fmri*", "*epi_asc*", "ax_asc_*", "fmri_ax_asc*", "*ep2d_bold*"]',
                              'description: ["*nothing*"]'))
    o = _receive(tmp_path, trial)
    kinds = sorted(f.kind for f in o.all_findings)
    assert kinds == ["missing_series", "unclassified_series"] and o.series[0].verdict == "unclassified"
    trial = _trial(tmp_path, ('description: ["epi pe=*"]', 'description: ["*epi*"]'),
                   ("      sites: [siemens-nih]\n", "      sites: [siemens-nih, ge-nih]\n"))
    o = _receive(tmp_path / "b", trial)
    assert sorted(f.kind for f in o.all_findings) == ["ambiguous_series", "missing_series"]


def test_roster_subjects(tmp_path):
    trial = _trial(tmp_path, ("  mode: pseudonym\n", "  mode: roster\n  roster: {ge-nih: {DEV: S001}}\n"))
    assert subject_label(trial, "ge-nih", "DEV") == "S001"
    with pytest.raises(SubjectError, match="not on the roster of site ge-nih"):
        subject_label(trial, "ge-nih", "someone-else")
    with pytest.raises(SubjectError, match="PatientID .* is empty"):
        subject_label(trial, "ge-nih", "  ")


def test_pseudonyms_are_keyed_and_stable(monkeypatch):
    trial = load_trial(DEMO_TRIAL)
    a = subject_label(trial, "ge-nih", "DEV")
    assert a == subject_label(trial, "ge-nih", "DEV") and a.isalnum() and "DEV" not in a
    assert a != subject_label(trial, "siemens-nih", "DEV")
    monkeypatch.setenv("CORELAB_PSEUDONYM_KEY", "another key")
    assert subject_label(trial, "ge-nih", "DEV") != a


@pytest.mark.parametrize("day,session,in_window,kinds", [
    (0, "baseline", True, []),
    (170, "month06", True, []),
    (200, "month06", False, ["out_of_window"]),
    (370, "month12", True, []),
    (-3, "unsched3before", False, ["out_of_window"]),
])
def test_visit_windows(day, session, in_window, kinds):
    trial = load_trial(DEMO_TRIAL)
    base = date(2020, 1, 1)
    v = assign_visit(trial, date.fromordinal(base.toordinal() + day), base if day else None,
                     {"baseline"} if day else set())
    assert (v.session, v.in_window, [f.kind for f in v.findings]) == (session, in_window, kinds)


def test_second_study_of_a_subject_gets_the_next_visit(tmp_path):
    trial = load_trial(DEMO_TRIAL)
    v = assign_visit(trial, date(2020, 7, 1), date(2020, 1, 1), {"baseline"})
    assert v.session == "month06" and v.days_from_baseline == 182
    v = assign_visit(trial, date(2021, 1, 1), date(2020, 1, 1), {"baseline", "month06", "month12"})
    assert v.session == "unsched366" and [f.kind for f in v.findings] == ["unscheduled_visit"]
