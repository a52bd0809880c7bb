"""TrialConfig: everything a trial locks before the first subject is scanned.

Loaded from YAML with :func:`load_trial`. Unknown keys and bad values are
errors that name the file, the line and the field, never a silent fallback to a
default. Code receives the config as an argument; nothing reads a global.

Sections: sites (AE titles, qualified scanners), protocol (series types, how to
recognise each, where it is required, parameter tolerances, vendor-specific
where vendors differ), visit schedule, subject identification,
de-identification options, QC and harmonization settings.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_contracts.bids import LABEL, check_value
from data_contracts.harmonization_settings import HarmonizationSettings
from data_contracts.qc_settings import QCSettings

SITE_ID = r"^[a-z0-9][a-z0-9-]*$"

# Canonical parameter names and units the protocol speaks in (see tasks/conformance/parameters.py).
PARAMETERS = {
    "field_strength": "T",
    "repetition_time": "ms",
    "echo_time": "ms",
    "inversion_time": "ms",
    "flip_angle": "deg",
    "slice_thickness": "mm",
    "pixel_spacing": "mm",
    "rows": "voxels",
    "columns": "voxels",
    "n_slices": "slices",
    "n_volumes": "volumes",
    "coverage_mm": "mm",
    "mr_acquisition_type": "",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerance(Strict):
    """An accepted range for one acquisition parameter.

    Give ``value`` with ``abs`` and/or ``rel`` (accept value ± max(abs, rel·value)),
    or ``min``/``max``, or ``one_of`` for categorical values.
    """

    value: float | None = Field(None, description="nominal value")
    abs: float | None = Field(None, ge=0, description="absolute tolerance around value")
    rel: float | None = Field(None, ge=0, le=1, description="relative tolerance around value")
    min: float | None = Field(None, description="lowest accepted value")
    max: float | None = Field(None, description="highest accepted value")
    one_of: list[str | float] | None = Field(None, description="accepted categorical values")
    severity: Literal["major", "minor"] = Field("major", description="severity of a violation")

    @model_validator(mode="after")
    def _one_form(self) -> "Tolerance":
        forms = [self.value is not None, self.min is not None or self.max is not None,
                 self.one_of is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of: value (+abs/rel), min/max, one_of")
        if (self.abs is not None or self.rel is not None) and self.value is None:
            raise ValueError("abs/rel need a value")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def accepts(self, observed: Any) -> bool:
        """True when ``observed`` lies within this tolerance (None never does)."""
        if observed is None:
            return False
        if self.one_of is not None:
            return any(_same(observed, v) for v in self.one_of)
        try:
            x = float(observed)
        except (TypeError, ValueError):
            return False
        if math.isnan(x):
            return False
        if self.value is not None:
            slack = max(self.abs or 0.0, (self.rel or 0.0) * abs(self.value))
            return abs(x - self.value) <= slack + 1e-9
        return (self.min is None or x >= self.min - 1e-9) and (self.max is None or x <= self.max + 1e-9)

    def describe(self) -> str:
        if self.one_of is not None:
            return "one of " + ", ".join(map(str, self.one_of))
        if self.value is not None:
            slack = max(self.abs or 0.0, (self.rel or 0.0) * abs(self.value))
            return f"{self.value:g} ± {slack:g}"
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


def _same(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-9
    except (TypeError, ValueError):
        return str(a).strip().upper() == str(b).strip().upper()


def _check_parameter_names(v: dict[str, Tolerance]) -> dict[str, Tolerance]:
    unknown = sorted(set(v) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; known: {sorted(PARAMETERS)}")
    return v


Tolerances = dict[str, Tolerance]


class Scanner(Strict):
    """A scanner qualified for the trial at one site."""

    manufacturer: str = Field(description="DICOM Manufacturer (0008,0070)")
    model: str = Field(description="DICOM ManufacturerModelName (0008,1090)")
    serial: str | None = Field(None, description="DICOM DeviceSerialNumber (0018,1000)")
    software_versions: list[str] = Field(
        default_factory=list, description="qualified SoftwareVersions (0018,1020), '\\'-joined")
    epoch: str | None = Field(None, description="scanner epoch label used as harmonization batch")


class Site(Strict):
    """A trial site."""

    id: str = Field(pattern=SITE_ID, description="site id, lower-case, used in paths")
    name: str = Field(description="human-readable name")
    ae_titles: list[str] = Field(default_factory=list, description="calling AE titles of its PACS")
    addresses: list[str] = Field(
        default_factory=list,
        description="source addresses its PACS may connect from: IP addresses or CIDR networks "
                    "(e.g. 10.1.2.0/24); empty: any address (the AE title alone decides)")
    scanners: list[Scanner] = Field(min_length=1, description="qualified scanners")

    @field_validator("ae_titles")
    @classmethod
    def _ae(cls, v: list[str]) -> list[str]:
        for ae in v:
            if not 0 < len(ae) <= 16:
                raise ValueError(f"AE title {ae!r} must be 1-16 characters")
        return v

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for addr in v:
            try:
                ipaddress.ip_network(addr, strict=False)
            except ValueError:
                raise ValueError(f"address {addr!r} is not an IP address or a CIDR network "
                                 "(e.g. 192.0.2.10 or 192.0.2.0/24)") from None
        return v


class SeriesMatch(Strict):
    """How to recognise a series type (all given criteria must hold)."""

    description: list[str] = Field(
        default_factory=list,
        description="case-insensitive globs on SeriesDescription or ProtocolName")
    parameters: Tolerances = Field(default_factory=dict)

    _names = field_validator("parameters")(_check_parameter_names)

    def matches(self, descriptions: list[str], params: dict[str, Any]) -> bool:
        if self.description and not any(
            fnmatch.fnmatchcase(d.lower(), pat.lower()) for d in descriptions if d
            for pat in self.description
        ):
            return False
        return all(tol.accepts(params.get(name)) for name, tol in self.parameters.items())


class Requirement(Strict):
    visits: list[str] = Field(default_factory=list, description="visits where it must be present")
    sites: list[str] | None = Field(None, description="sites it is required at (default: all)")


class SeriesType(Strict):
    """One series of the protocol and its BIDS destination."""

    name: str = Field(description="protocol name of the series type, e.g. T1w")
    datatype: Literal["anat", "func", "dwi", "fmap", "perf"] = Field(description="BIDS datatype")
    suffix: str = Field(pattern=r"^[A-Za-z0-9]+$", description="BIDS suffix")
    entities: dict[str, str] = Field(default_factory=dict, description="BIDS entities, e.g. task")
    match: SeriesMatch
    required: Requirement = Field(default_factory=Requirement)
    sites: list[str] | None = Field(None, description="sites that acquire it (default: all)")
    tolerances: Tolerances = Field(default_factory=dict)
    vendor_tolerances: dict[str, Tolerances] = Field(
        default_factory=dict, description="per vendor (ge, siemens, philips, ...) overrides")
    site_tolerances: dict[str, Tolerances] = Field(
        default_factory=dict, description="per site overrides, applied after the vendor's (a 7 T site's TE)")

    _names = field_validator("tolerances")(_check_parameter_names)

    @field_validator("site_tolerances")
    @classmethod
    def _site_parameter_names(cls, v: dict[str, dict[str, Tolerance]]) -> dict[str, dict[str, Tolerance]]:
        for tols in v.values():
            _check_parameter_names(tols)
        return v

    @field_validator("entities")
    @classmethod
    def _bids_entities(cls, v: dict[str, str]) -> dict[str, str]:
        """Entities of the one BIDS table, with values it allows (a file name is built from them)."""
        for key, value in v.items():
            if key in ("sub", "ses"):
                raise ValueError(f"entity {key!r} is set by corelab (subject and visit), not by the protocol")
            check_value(key, value)
        return v

    @field_validator("vendor_tolerances")
    @classmethod
    def _vendor_names(cls, v: dict[str, dict[str, Tolerance]]) -> dict[str, dict[str, Tolerance]]:
        for vendor, tols in v.items():
            if vendor not in VENDORS:
                raise ValueError(f"unknown vendor {vendor!r}; known: {sorted(VENDORS)}")
            _check_parameter_names(tols)
        return v

    def tolerances_for(self, vendor: str, site_id: str | None = None) -> dict[str, Tolerance]:
        """The trial's tolerances, overridden by the vendor's, then by the site's."""
        return {**self.tolerances, **self.vendor_tolerances.get(vendor, {}),
                **self.site_tolerances.get(site_id or "", {})}


class Protocol(Strict):
    series_types: list[SeriesType] = Field(min_length=1)

    @field_validator("series_types")
    @classmethod
    def _unique(cls, v: list[SeriesType]) -> list[SeriesType]:
        names = [s.name for s in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"series type names must be unique: {sorted(dup)}")
        return v


class Visit(Strict):
    id: str = Field(pattern=LABEL, description="visit id, also the BIDS session label")
    day: int = Field(ge=0, description="nominal day after baseline")
    window_before: int = Field(0, ge=0, description="days accepted before the nominal day")
    window_after: int = Field(0, ge=0, description="days accepted after the nominal day")


class SubjectIds(Strict):
    """How a site's PatientID becomes a trial subject label."""

    mode: Literal["roster", "pseudonym"]
    roster: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="site -> {PatientID: subject label}")
    secret_env: str = Field("CORELAB_PSEUDONYM_KEY",
                            description="environment variable holding the pseudonym key")
    prefix: str = Field("", pattern=r"^[A-Za-z0-9]*$", description="prefix of pseudonyms")

    @model_validator(mode="after")
    def _roster_labels(self) -> "SubjectIds":
        for site, ids in self.roster.items():
            for label in ids.values():
                if not re.match(LABEL, label):
                    raise ValueError(f"roster of {site}: subject label {label!r} is not alphanumeric")
        if self.mode == "roster" and not self.roster:
            raise ValueError("mode 'roster' needs a roster")
        return self


class Defacing(Strict):
    """Head images (every ``anat`` image) get a defaced copy as the ``deface`` BIDS derivative."""

    enabled: bool = Field(True, description="deface every anat image the BIDS stage converts")
    original: Literal["restricted", "replaced"] = Field(
        "restricted",
        description="restricted: bids/ keeps the image with the face (a restricted store, as are deid/ and "
                    "the pipelines' own derivatives such as anat's desc-preproc_T1w); only derivatives/deface-* "
                    "may be shared; replaced: once all three checks have passed (the third needs a pipeline's "
                    "brain mask, so only images a pipeline processed, T1w today) the bids/ image becomes the "
                    "defaced copy and the face stays in deid/ (the pipelines ran on the original)")


class Deidentification(Strict):
    """PS3.15 Annex E Basic Profile plus options (each configurable)."""

    retain_longitudinal_modified_dates: bool = True
    retain_patient_characteristics: bool = True
    retain_device_identity: bool = True
    clean_descriptors: bool = True
    retain_safe_private: bool = True
    secret_env: str = Field("CORELAB_DEID_KEY",
                            description="environment variable with the key for UIDs and date shifts")
    max_date_shift_days: int = Field(365, ge=1, le=3650,
                                     description="dates move back by 1..N days, per subject")
    defacing: Defacing = Field(default_factory=Defacing)


class TrialConfig(Strict):
    trial_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    name: str = ""
    sites: list[Site] = Field(min_length=1)
    protocol: Protocol
    visits: list[Visit] = Field(min_length=1)
    subjects: SubjectIds
    deidentification: Deidentification = Field(default_factory=Deidentification)
    qc: QCSettings = Field(default_factory=QCSettings)
    query_due_working_days: int = Field(5, ge=1, le=60,
                                        description="working days (Mon-Fri) a site has to answer a query "
                                                    "before it is escalated")
    harmonization: HarmonizationSettings = Field(default_factory=HarmonizationSettings)

    @model_validator(mode="after")
    def _cross_refs(self) -> "TrialConfig":
        site_ids = [s.id for s in self.sites]
        if len(set(site_ids)) != len(site_ids):
            raise ValueError("site ids must be unique")
        visit_ids = [v.id for v in self.visits]
        if self.visits[0].day != 0:
            raise ValueError(f"the first visit ({visit_ids[0]}) is the baseline and must have day 0")
        for st in self.protocol.series_types:
            for ref in (st.sites or []) + (st.required.sites or []) + list(st.site_tolerances):
                if ref not in site_ids:
                    raise ValueError(f"series type {st.name}: unknown site {ref!r}")
            for v in st.required.visits:
                if v not in visit_ids:
                    raise ValueError(f"series type {st.name}: unknown visit {v!r}")
        for site in list(self.subjects.roster) + list(self.qc.site_rules):
            if site not in site_ids:
                raise ValueError(f"unknown site {site!r} in subjects.roster or qc.site_rules")
        return self

    def site(self, site_id: str) -> Site:
        for s in self.sites:
            if s.id == site_id:
                return s
        raise UnknownSiteError(
            f"site {site_id!r} is not in trial {self.trial_id}; known sites: "
            + ", ".join(s.id for s in self.sites))

    def series_types_for(self, site_id: str) -> list[SeriesType]:
        return [st for st in self.protocol.series_types if st.sites is None or site_id in st.sites]

    def secret(self, env: str) -> bytes:
        """A key from the environment; never stored in the config or the lake."""
        value = os.environ.get(env)
        if not value:
            raise MissingSecretError(
                f"environment variable {env} is not set: trial {self.trial_id} needs it as the "
                "key for pseudonyms, UID replacement and date shifts (never written anywhere)")
        return value.encode()


VENDORS = {"siemens", "ge", "philips", "canon", "hitachi", "fujifilm", "united"}


def vendor_of(manufacturer: str | None) -> str:
    """Normalise a DICOM Manufacturer to a vendor key ('' when unknown)."""
    m = (manufacturer or "").lower()
    for key, needles in (("siemens", ("siemens",)), ("ge", ("ge medical", "ge healthcare", "gems")),
                         ("philips", ("philips",)), ("canon", ("canon", "toshiba")),
                         ("hitachi", ("hitachi",)), ("fujifilm", ("fujifilm",)),
                         ("united", ("united imaging", "uih"))):
        if any(n in m for n in needles):
            return key
    return "ge" if m.strip() == "ge" else ""


class TrialConfigError(ValueError):
    """A trial file that cannot be used; the message names file, line and field."""


class UnknownSiteError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingSecretError(RuntimeError):
    pass


def load_trial(path: str | os.PathLike[str]) -> TrialConfig:
    """Read and validate a trial YAML file.

    Raises
    ------
    TrialConfigError
        With one line per problem: ``file:line: field.path: message``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrialConfigError(f"{path}: cannot read the trial file ({exc.strerror})") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TrialConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise TrialConfigError(f"{path}: the trial file must be a mapping of sections")
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"{path}:{_line_of(node, loc)}: {field}: {err['msg']}")
        raise TrialConfigError("invalid trial configuration\n" + "\n".join(lines)) from None


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """Line (1-based) of the deepest YAML node on ``loc`` that exists."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(part)), None)
            if nxt is None:
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line
