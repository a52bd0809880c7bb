"""Protocol conformance: classify each series, check its parameters, scanner and completeness.

Every decision is a plain value (a :class:`Finding`), so the flow can record it,
a site query can quote it, and a test can assert it exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data_contracts.trial import PARAMETERS, SeriesType, Site, TrialConfig, vendor_of
from tasks.conformance.findings import Finding


@dataclass
class SeriesCheck:
    series_type: str | None
    verdict: str                       # conform | deviation | unclassified | incomplete
    findings: list[Finding] = field(default_factory=list)


def classify(descriptions: list[str], params: dict[str, Any], types: list[SeriesType]) -> list[SeriesType]:
    """Every series type whose recognition criteria the series meets."""
    return [st for st in types if st.match.matches(descriptions, params)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "missing" if v is None else str(v)


def check_parameters(st: SeriesType, vendor: str, params: dict[str, Any], series_key: str,
                     site_id: str | None = None) -> list[Finding]:
    """One finding per parameter outside its (vendor- and site-specific) tolerance."""
    out = []
    for name, tol in sorted(st.tolerances_for(vendor, site_id).items()):
        observed = params.get(name)
        if tol.accepts(observed):
            continue
        unit = PARAMETERS.get(name, "")
        out.append(Finding(
            kind="parameter", severity=tol.severity, parameter=name,
            expected=f"{tol.describe()} {unit}".strip(), observed=f"{_fmt(observed)} {unit}".strip(),
            message=(f"{st.name}: {name} is {_fmt(observed)} {unit}, protocol expects "
                     f"{tol.describe()} {unit}").strip(),
            series_key=series_key))
    return out


def check_series(descriptions: list[str], params: dict[str, Any], manufacturer: str | None,
                 trial: TrialConfig, site_id: str, series_key: str, label: str,
                 derived: str | None = None, incomplete: str | None = None) -> SeriesCheck:
    """Classify one series and check it against its series type.

    ``descriptions`` are the original SeriesDescription and ProtocolName (used
    only to match); ``label`` is the de-identified description that messages quote.
    ``derived`` says why every image of the series is a scanner-computed one (a TRACEW or ADC
    series of its own): such a series is no acquisition of the protocol, whatever its name says.
    """
    if derived:
        return SeriesCheck(None, "unclassified", [Finding(
            kind="derived_image", severity="minor", series_key=series_key, observed=derived,
            message=f"series '{label}' holds only derived images ({derived}); it is kept but not "
                    "converted, as it is no acquisition", reason_code="derived_image")])
    candidates = classify(descriptions, params, trial.series_types_for(site_id))
    if not candidates:
        return SeriesCheck(None, "unclassified", [Finding(
            kind="unclassified_series", severity="minor", series_key=series_key,
            message=f"series '{label}' matches no series type of the protocol; it is kept but not converted")])
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        return SeriesCheck(None, "unclassified", [Finding(
            kind="ambiguous_series", severity="major", series_key=series_key, observed=names,
            message=f"series '{label}' matches several series types ({names}); not converted until resolved")])
    st = candidates[0]
    findings = check_parameters(st, vendor_of(manufacturer), params, series_key, site_id)
    if incomplete:
        return SeriesCheck(st.name, "incomplete", findings + [Finding(
            kind="incomplete_series", severity="major", series_key=series_key, observed=incomplete,
            message=f"{st.name} series '{label}' is incomplete: {incomplete}; it is kept but not converted "
                    "until the site sends the rest", reason_code="incomplete_series")])
    return SeriesCheck(st.name, "deviation" if findings else "conform", findings)


# -- scanners ---------------------------------------------------------------------------
def _norm(s: str | None) -> str:
    return " ".join((s or "").split()).casefold()


def epoch_id(manufacturer: str | None, model: str | None, serial: str | None, software: str | None) -> str:
    """A stable label for one scanner + software version (a harmonization batch)."""
    text = "|".join(_norm(x) for x in (manufacturer, model, serial, software))
    return "E" + hashlib.sha256(text.encode()).hexdigest()[:8]


def check_scanner(site: Site, identity: dict[str, str | None], series_key: str | None = None,
                  show: Callable[[str | None], str | None] = lambda serial: serial) -> tuple[str, list[Finding]]:
    """The scanner epoch of a series, and a finding if the scanner is not qualified as is.

    An unknown scanner and a qualified scanner with a new software version
    both start a new scanner epoch, which harmonization must treat as a batch.
    Serial numbers are compared as received and reported as ``show`` makes them: as they are when
    the trial retains device identity, else as keyed labels (the epoch is then keyed too).
    """
    man, model = identity.get("manufacturer"), identity.get("model")
    serial, sw = identity.get("device_serial"), identity.get("software_versions")
    epoch = epoch_id(man, model, show(serial), sw)
    same_machine = [s for s in site.scanners
                    if vendor_of(s.manufacturer) == vendor_of(man) and _norm(s.model) == _norm(model)
                    and (s.serial is None or _norm(s.serial) == _norm(serial))]
    observed = f"{man} {model} serial {show(serial)} software {sw}"
    if not same_machine:
        qualified = "; ".join(f"{s.manufacturer} {s.model} serial {show(s.serial)}" for s in site.scanners)
        return epoch, [Finding(
            kind="unknown_scanner", severity="major", series_key=series_key,
            expected=qualified, observed=observed,
            message=f"scanner {observed} is not qualified for site {site.id} (qualified: {qualified})")]
    for s in same_machine:
        if not s.software_versions or any(_norm(v) == _norm(sw) for v in s.software_versions):
            return (s.epoch or epoch), []
    versions = ", ".join(v for s in same_machine for v in s.software_versions)
    return epoch, [Finding(
        kind="new_scanner_epoch", severity="major", series_key=series_key,
        parameter="software_versions", expected=versions, observed=sw,
        message=(f"{man} {model} at site {site.id} runs software {sw}, qualified: {versions}; "
                 f"recorded as new scanner epoch {epoch}"))]


# -- completeness -----------------------------------------------------------------------
def check_completeness(trial: TrialConfig, site_id: str, visit: str, present: set[str]) -> list[Finding]:
    """A finding for each series type required at this site and visit but absent."""
    out = []
    for st in trial.series_types_for(site_id):
        req = st.required
        if visit not in req.visits or (req.sites is not None and site_id not in req.sites):
            continue
        if st.name not in present:
            out.append(Finding(
                kind="missing_series", severity="major", expected=st.name, observed="absent",
                message=f"required series {st.name} is missing from visit {visit} at site {site_id}"))
    return out
