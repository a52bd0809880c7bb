"""The receive_study flow end to end on every DICOM series of ../shared/data (Prefect embedded)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.cli.demo import DEMO_UPLOADS
from flows.receive_study import receive_study
from tasks.lake.audit import verify_chain
from tasks.lake.storage import Lake
from tasks.lake.tables import read_table
from tests.data import shared_path
from tests.helpers import DEMO_TRIAL, GE_SERIES, copy_upload, gz, rewrite

pytestmark = pytest.mark.prefect

# Identifying values the MANIFEST lists for the real data (five characters or more: shorter
# ones such as "DEV" or "NIH" are checked by tests/test_deid.py at element level).
MANIFEST_PHI = [
    "Test^Regression", "Regression", "19700101", "20180918", "NIH FMRIF", "Bethesda",
    "10 Center Drive", "stc_test", "crlab", "19800707", "20140310", "Columbia", "Medical Center Dr",
    "phantom", "19660101", "20140214", "Leibniz Institut Magdeburg", "d2n_Philips_3T_R571",
    "19800501", "20210902", "XAtest_sub-July11", "12343@hucheng", "19910101", "20220711",
    "Indiana University", "Bloomington", "East 10th Street",
]
EXPECTED_TYPES = {
    "ge-nih": ["bold"] * 4, "siemens-nih": ["epi"] * 4, "siemens-trio": ["bold"],
    "philips-achieva": ["bold"], "philips-ingenia": ["T1w"], "siemens-xa30": ["T1w"], "philips-dwi": ["dwi"],
}


@pytest.fixture(scope="module")
def received(prefect_harness, tmp_path_factory, trial):
    """Every site of the demo trial sends its real study once."""
    lake_dir = tmp_path_factory.mktemp("lake")
    outcomes = {}
    for site, rel in DEMO_UPLOADS.items():
        outcomes[site] = receive_study(str(shared_path(rel)), site, lake_url=str(lake_dir), trial=trial)
    return Lake(str(lake_dir)), outcomes


def _decoded_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if path.suffix == ".parquet":
        data = json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
    return data


def test_every_series_gets_its_type_and_is_accepted(received):
    lake, outcomes = received
    for site, expected in EXPECTED_TYPES.items():
        (o,) = outcomes[site]
        assert o.status in ("accepted", "accepted_with_deviations"), (site, o.all_findings)
        assert [s.series_type for s in o.series] == expected, site
        assert all(s.verdict == "conform" for s in o.series), (site, [s.findings for s in o.series])
        assert o.study.session == "baseline"
    series = read_table(lake, "series")
    assert len(series) == 13 and set(series["site"]) == set(EXPECTED_TYPES)
    xa = series[series["site"] == "siemens-xa30"].iloc[0]
    assert (xa["repetition_time"], xa["echo_time"], xa["inversion_time"]) == (1800.0, 2.41, 900.0)


def test_no_phi_from_the_manifest_anywhere_outside_restricted_stores(received):
    lake, _ = received
    root = Path(lake.root)
    checked = 0
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.split("/")[0] in ("inbox", "quarantine", ".locks"):
            continue
        content = _decoded_bytes(path).lower()
        for value in MANIFEST_PHI:
            assert value.lower().encode() not in content, f"{value!r} in {rel}"
            assert value.lower() not in rel.lower(), f"{value!r} in the name {rel}"
        checked += 1
    assert checked > 800  # every de-identified file, table partition and audit event


def test_inbox_released_only_for_verified_files(received):
    lake, outcomes = received
    # only what was quarantined stays in the inbox: notes and READMEs, and the Philips DWI export's
    # presentation states (PS_*, XX_*: no pixel data) and its DICOMDIR
    left = [p for p in lake.find("inbox")]
    assert left and all(p.endswith(".txt") or p.rsplit("/", 1)[-1].startswith(("PS_", "XX_", "DICOMDIR"))
                        for p in left), left
    for p in left:
        name = p.split("/", 3)[3]
        assert lake.exists(f"quarantine/{p.split('/')[1]}/{p.split('/')[2]}/{name}.reason.json")


def test_second_ingest_changes_no_table(received, trial):
    lake, _ = received
    parts = {p: (Path(lake.path(p)).read_bytes(), Path(lake.path(p)).stat().st_mtime_ns)
             for p in lake.find("tables")}
    again = receive_study(str(shared_path(*GE_SERIES[:3])), "ge-nih", lake_url=lake.url, trial=trial)
    assert [o.already_received for o in again] == [True]
    # the re-sent raw files were staged again, and released again: no PHI piles up in the inbox
    assert not [p for p in lake.find("inbox/ge-nih") if p.endswith(".dcm")]
    after = {p: (Path(lake.path(p)).read_bytes(), Path(lake.path(p)).stat().st_mtime_ns)
             for p in lake.find("tables")}
    assert after == parts


def test_audit_chain_is_intact_and_detects_tampering(received, tmp_path):
    lake, _ = received
    report = verify_chain(lake)
    assert report.ok and report.events >= 6
    copy = Lake(str(tmp_path / "copy"))
    for p in lake.find("audit"):
        copy.write_bytes(p, lake.read_bytes(p))
    event = json.loads(copy.read_text("audit/events/000000000002.json"))
    event["details"]["n_files"] += 1
    copy.write_text("audit/events/000000000002.json", json.dumps(event))
    broken = verify_chain(copy)
    assert not broken.ok and any("event 2" in p for p in broken.problems)


def test_bad_files_are_quarantined_and_the_rest_accepted(prefect_harness, tmp_path, trial):
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=10)
    files = sorted(up.iterdir())
    files[0].write_bytes(files[0].read_bytes()[:3000])           # truncated
    (up / "noise.dcm").write_bytes(os.urandom(3000))              # random bytes named .dcm
    rewrite(files[1], SOPInstanceUID=None)                        # missing SOPInstanceUID
    bad = gz(files[2])
    bad.write_bytes(bad.read_bytes()[:400])                       # corrupt .gz
    rewrite(files[3], Columns=256)                                # header lies about its size
    lake_dir = tmp_path / "lake"
    (o,) = receive_study(str(up), "ge-nih", lake_url=str(lake_dir), trial=trial)
    lake = Lake(str(lake_dir))
    assert o.status == "accepted_with_deviations"
    assert [s.n_files for s in o.series] == [6]
    bad_names = {files[0].name, "noise.dcm", files[1].name, bad.name, files[3].name}
    for name in bad_names:
        reason = json.loads(lake.read_text(f"quarantine/ge-nih/{_upload(lake)}/{name}.reason.json"))
        assert reason["file"] == name and reason["reason"].startswith(name + ":")
        assert lake.exists(f"inbox/ge-nih/{_upload(lake)}/{name}")      # raw kept
    assert len([p for p in lake.find("deid") if p.endswith(".dcm")]) == 6
    kinds = read_table(lake, "deviations")["kind"].tolist()
    assert kinds.count("quarantined_file") == 5


def _upload(lake: Lake) -> str:
    (upload,) = lake.listdir("quarantine/ge-nih")
    return upload


def test_cli_exit_codes(prefect_harness, tmp_path):
    runner = CliRunner()
    lake = str(tmp_path / "lake")
    args = ["--trial", str(DEMO_TRIAL), "--lake", lake]
    up = tmp_path / "junk"
    up.mkdir()
    (up / "a.dcm").write_bytes(b"not dicom at all" * 100)
    res = runner.invoke(app, ["ingest", str(up), "--site", "ge-nih", *args])
    assert res.exit_code == 1 and "nothing was accepted" in res.output
    res = runner.invoke(app, ["ingest", str(up), "--site", "mayo", *args])
    assert res.exit_code == 2 and "site 'mayo' is not in trial" in res.output
    good = copy_upload(tmp_path / "good", *GE_SERIES, limit=3)
    res = runner.invoke(app, ["ingest", str(good), "--site", "ge-nih", *args])
    assert res.exit_code == 0, res.output
    # three slices of one volume of ten: a bold series, short of the protocol's volumes and incomplete
    # (kept, not converted, asked for): nothing failed, the command succeeds
    assert "bold" in res.output and "incomplete" in res.output and "n_volumes is 1" in res.output
    res = runner.invoke(app, ["audit", "verify", "--lake", lake])
    assert res.exit_code == 0 and "audit log intact" in res.output


def test_burned_in_series_is_refused_and_the_rest_of_the_study_accepted(tmp_path, trial, monkeypatch):
    import tasks.receive.study as intake
    from tasks.intake.inventory import inventory_upload
    from tasks.receive.study import Upload, receive_one_study

    up = tmp_path / "up"
    copy_upload(up / "a", *GE_SERIES, limit=30)
    for p in sorted(copy_upload(up / "b", "dcm_qa_nih", "In", "20180918GE", "mr_0005", limit=30).iterdir()):
        rewrite(p, BurnedInAnnotation="YES")
    hashes = {}
    # 60 files: over the threshold both series go to worker processes, under it neither does
    for mode, threshold in (("workers", 48), ("in-process", 61)):
        monkeypatch.setattr(intake, "PARALLEL_MIN_FILES", threshold)
        lake = Lake(str(tmp_path / f"lake-{mode}")).init()
        o = receive_one_study(Upload(trial, "ge-nih", "u1", lake), inventory_upload(up).accepted)
        good, burned = o.series
        assert good.verdict != "rejected" and good.deid_path and burned.verdict == "rejected"
        assert burned.burned_in and not good.burned_in
        # 30 files are 2 of the series' 10 volumes: incomplete too, both said
        majors = [f.kind for f in burned.findings if f.severity == "major"]
        assert majors == ["incomplete_series", "burned_in_annotation"]
        assert len(o.quarantined) == 30 and all(q.code == "burned_in" for q in o.quarantined)
        assert all(q.reason.startswith("b/") and "BurnedInAnnotation is YES" in q.reason for q in o.quarantined)
        written = [p for p in lake.find("deid") if p.endswith(".dcm")]
        assert len(written) == 30 and all(p.startswith(good.deid_path) for p in written)
        hashes[mode] = good.content_sha256
    assert hashes["workers"] == hashes["in-process"]   # the same bytes whichever process made them


def test_a_bug_in_intake_fails_the_run_keeps_the_upload_and_is_audited(prefect_harness, tmp_path, trial,
                                                                        monkeypatch):
    """Not an attribution problem: no quarantine, no verdict, a red run, the raw files kept."""
    import tasks.receive.study as study
    from tasks.lake.audit import read_events

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in a protocol check")

    monkeypatch.setattr(study, "check_series", broken)
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    lake_dir = tmp_path / "lake"
    state = receive_study(str(up), "ge-nih", lake_url=str(lake_dir), trial=trial, return_state=True)
    assert state.is_failed() and "ZeroDivisionError" in state.message
    lake = Lake(str(lake_dir))
    (upload,) = lake.listdir("inbox/ge-nih")
    assert sorted(p.rsplit("/", 1)[-1] for p in lake.find(f"inbox/ge-nih/{upload}")) == \
        sorted(p.name for p in up.iterdir())
    assert lake.find("quarantine") == [] and read_table(lake, "studies").empty
    (event,) = [e for e in read_events(lake) if e["action"] == "study_failed"]
    assert event["details"] == {"site": "ge-nih", "upload": upload, "n_files": 3,
                                "error": "ZeroDivisionError", "reason_code": None}


def test_an_unattributable_study_is_quarantined_with_its_code(prefect_harness, tmp_path, trial):
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    for p in up.iterdir():
        rewrite(p, PatientID="")
    lake_dir = tmp_path / "lake"
    assert receive_study(str(up), "ge-nih", lake_url=str(lake_dir), trial=trial) == []
    lake = Lake(str(lake_dir))
    reasons = [json.loads(lake.read_text(p)) for p in lake.find("quarantine") if p.endswith(".reason.json")]
    assert len(reasons) == 3 and {r["code"] for r in reasons} == {"unattributable"}
    assert all("PatientID (0010,0020) is empty" in r["reason"] for r in reasons)


def test_a_bug_reaches_the_cli_user_as_one_line_not_a_traceback(prefect_harness, tmp_path, monkeypatch, capsys):
    import sys

    import tasks.receive.study as study
    from flows.cli import main

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in a protocol check")

    monkeypatch.setattr(study, "check_series", broken)
    up = copy_upload(tmp_path / "up", *GE_SERIES, limit=3)
    monkeypatch.setattr(sys, "argv", ["corelab", "ingest", str(up), "--site", "ge-nih", "--trial", str(DEMO_TRIAL),
                                      "--lake", str(tmp_path / "lake"), "--no-process"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "error: ZeroDivisionError: a bug in a protocol check" in err and "Nothing received was lost" in err
    assert "Traceback" not in err
