"""TrialConfig: the example loads; every mistake names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_contracts import example_path
from data_contracts.trial import (
    MissingSecretError,
    Tolerance,
    TrialConfigError,
    UnknownSiteError,
    load_trial,
    vendor_of,
)

EXAMPLE = example_path()


def test_example_trial_loads_with_the_required_sites():
    trial = load_trial(EXAMPLE)
    assert [s.id for s in trial.sites] == ["ge-nih", "siemens-nih", "siemens-trio", "philips-achieva",
                                           "philips-ingenia", "siemens-xa30",
                                           # the new folders of ../shared/data, as the issue names them
                                           "siemens-ts", "agfa-pacs", "siemens-vida", "siemens-12bit",
                                           "philips-dwi", "siemens-xa60", "siemens-xa61"]
    assert {st.name for st in trial.protocol.series_types} == {"T1w", "bold", "dwi", "epi", "qc_phantom"}
    assert trial.visits[0].day == 0


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "trial.yaml"
    p.write_text(text)
    return p


def _mutated(tmp_path: Path, old: str, new: str) -> Path:
    text = EXAMPLE.read_text()
    assert old in text, old
    return _write(tmp_path, text.replace(old, new, 1))


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_unknown_key_names_file_line_and_field(tmp_path):
    p = _mutated(tmp_path, "    name: Siemens Trio site\n", "    name: Siemens Trio site\n    colour: red\n")
    with pytest.raises(TrialConfigError) as exc:
        load_trial(p)
    msg = str(exc.value)
    assert f"{p}:{_line_of(p, 'colour: red')}: sites.2.colour: Extra inputs are not permitted" in msg


def test_bad_tolerance_is_reported_at_its_line(tmp_path):
    p = _mutated(tmp_path, "echo_time: {value: 30, abs: 2}", "echo_time: {min: 40, max: 20}")
    with pytest.raises(TrialConfigError) as exc:
        load_trial(p)
    msg = str(exc.value)
    assert "protocol.series_types.1.tolerances.echo_time" in msg
    assert "min 40.0 is above max 20.0" in msg
    assert f"{p}:{_line_of(p, 'echo_time: {min: 40')}:" in msg


def test_unknown_parameter_name_is_an_error(tmp_path):
    p = _mutated(tmp_path, "echo_time: {value: 30, abs: 2}", "echo_tim: {value: 30, abs: 2}")
    with pytest.raises(TrialConfigError, match="unknown parameter"):
        load_trial(p)


def test_cross_reference_to_unknown_site(tmp_path):
    p = _mutated(tmp_path, "sites: [siemens-nih]\n      tolerances", "sites: [siemens-nyc]\n      tolerances")
    with pytest.raises(TrialConfigError, match="unknown site 'siemens-nyc'"):
        load_trial(p)


def test_invalid_yaml_gives_line(tmp_path):
    p = _write(tmp_path, "trial_id: X\nsites: [\n")
    with pytest.raises(TrialConfigError, match=rf"{p}:\d+: not valid YAML"):
        load_trial(p)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(TrialConfigError, match="cannot read the trial file"):
        load_trial(tmp_path / "nope.yaml")


def test_unknown_site_lists_known_sites():
    trial = load_trial(EXAMPLE)
    with pytest.raises(UnknownSiteError, match="known sites: ge-nih, siemens-nih"):
        trial.site("mayo")


def test_missing_secret_is_named(monkeypatch):
    trial = load_trial(EXAMPLE)
    monkeypatch.delenv("CORELAB_DEID_KEY", raising=False)
    with pytest.raises(MissingSecretError, match="CORELAB_DEID_KEY is not set"):
        trial.secret("CORELAB_DEID_KEY")


@pytest.mark.parametrize("tol,value,ok", [
    (dict(value=3.0, abs=0.1), 3.05, True), (dict(value=3.0, abs=0.1), 2.85, False),
    (dict(value=2000, rel=0.02), 2039, True), (dict(value=2000, rel=0.02), 2041, False),
    (dict(min=160), 159.9, False), (dict(one_of=["3D"]), "3d", True), (dict(one_of=["3D"]), None, False),
])
def test_tolerance_accepts(tol, value, ok):
    assert Tolerance(**tol).accepts(value) is ok


def test_vendor_names():
    assert vendor_of("GE MEDICAL SYSTEMS") == "ge"
    assert vendor_of("Siemens Healthineers") == "siemens"
    assert vendor_of("Philips Medical Systems") == "philips"
    assert vendor_of("Acme") == ""


def test_a_protocol_entity_that_no_bids_name_may_hold_is_refused_at_load(tmp_path):
    import yaml

    from data_contracts.trial import TrialConfigError, load_trial

    for entities, message in (({"acq": "mp-rage"}, "letters and digits"), ({"colour": "red"}, "unknown BIDS entit"),
                              ({"run": "x"}, "digits"), ({"sub": "01"}, "set by corelab")):
        raw = yaml.safe_load(EXAMPLE.read_text())
        raw["protocol"]["series_types"][0]["entities"] = entities
        bad = tmp_path / "trial.yaml"
        bad.write_text(yaml.safe_dump(raw))
        with pytest.raises(TrialConfigError, match=message):
            load_trial(bad)
