"""What harmonization refuses to do, and why, in words a statistician can act on.

Every check that can stop a fit produces a :class:`Finding`. Findings at level
``refusal`` end the fit with :class:`HarmonizationRefused` (which carries all
findings, so a report of the refusal can still be written); ``warning`` and
``info`` findings travel with the model into its metadata and report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Level = Literal["refusal", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One observation about the input or the fit.

    Attributes
    ----------
    level
        ``refusal`` stops the fit, ``warning`` is reported, ``info`` is context.
    code
        Stable machine-readable kind, e.g. ``nan_feature``, ``small_site``.
    message
        One sentence naming the column/site/row and what to do about it.
    where
        The objects concerned (``{"feature": ..., "site": ...}``), for the JSON report.
    """

    level: Level
    code: str
    message: str
    where: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HarmonizationError(ValueError):
    """Base class of every harmonization failure that is the input's fault."""


class HarmonizationRefused(HarmonizationError):
    """The input cannot be harmonized honestly; ``findings`` says why (all of it)."""

    def __init__(self, findings: list[Finding]):
        self.findings = list(findings)
        refusals = [f.message for f in self.findings if f.level == "refusal"]
        super().__init__("harmonization refused:\n  - " + "\n  - ".join(refusals))


class NoRowsToHarmonize(HarmonizationRefused):
    """Nothing is left to harmonize: no rows, no feature, or no biomarker row with covariates.

    ComBat on an empty input would not fail with a message of its own but with an
    ``IndexError`` somewhere inside; this says which input was empty and why
    (finding codes ``no_rows``, ``no_features``, ``no_covariate_match``).
    """


class InputTableError(HarmonizationError):
    """A table file that cannot be read or lacks a named column."""


class ModelNotFoundError(HarmonizationError):
    """No stored model with that id."""


class ModelMismatchError(HarmonizationError):
    """New data does not carry the features or covariates a frozen model needs."""


class ModelTrialError(HarmonizationError):
    """A model that was not fitted on this trial's lake rows: it cannot be promoted or applied."""


class PromotionError(HarmonizationError):
    """The promoted-model pointer of a trial cannot be read (damaged or edited)."""


def refusals(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "refusal"]


def raise_if_refused(findings: list[Finding]) -> None:
    """Raise :class:`HarmonizationRefused` when any finding is a refusal."""
    if refusals(findings):
        raise HarmonizationRefused(findings)
