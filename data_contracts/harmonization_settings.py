"""Harmonization settings of a trial (the ``harmonization:`` section of TrialConfig)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class HarmonizationSettings(BaseModel):
    """How ComBat runs for this trial."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: Literal["site", "site_epoch"] = Field(
        "site_epoch", description="batch = site, or site + scanner epoch when a scanner changed")
    covariates: list[str] = Field(
        default_factory=lambda: ["AGE", "SEX"], description="biological covariates ComBat keeps")
    smooth_terms: list[str] = Field(
        default_factory=list, description="covariates modelled as smooth (ComBat-GAM)")
    reference_visits: list[str] = Field(
        default_factory=lambda: ["baseline"], description="visits the model is fitted on")
    min_site_n: int = Field(20, ge=2, description="smallest batch ComBat may estimate")
    small_site: Literal["refuse", "pool"] = Field(
        "refuse", description="what to do with a batch below min_site_n")
    max_confounding: float = Field(
        0.8, ge=0, le=1, description="refuse when a covariate is this confounded with site (Cramér's V / eta)")
    categorical_covariates: list[str] = Field(
        default_factory=list,
        description="numeric covariates to treat as categories (one indicator per level); "
                    "text covariates are always categorical")
    reference_qc_status: list[Literal["PASS", "WARN"]] = Field(
        default_factory=lambda: ["PASS"], description="QC verdicts of the rows a model is fitted on")
    pipeline: str | None = Field(
        None, description="the pipeline whose measures are harmonized (anat, dwi, ...): one model per "
                          "pipeline; none: the only pipeline whose measures are there")
    seed: int = Field(
        0, ge=0, description="seed of the k-fold penalty search of smooth terms (reproducible fits)")
    smooth_term_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="range each smooth term's spline covers (neuroHarmonize's smooth_term_bounds), e.g. "
                    "AGE: [18, 95], wider than the fitted rows so later visits stay inside the model")
    covariate_limits: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"AGE": (0.0, 120.0)},
        description="values a covariate can take at all; a row outside is refused, never harmonized")
    repeated: Literal["refuse", "independent", "longitudinal"] = Field(
        "refuse", description="subjects with more than one scan: refuse (ComBat takes scans as independent), "
                              "fit them as independent scans anyway (said in the report), or fit longitudinal "
                              "ComBat (a random intercept per subject, Beer et al. 2020)")
    eb: bool = Field(True, description="empirical Bayes shrinkage of the site estimates (Johnson et al. 2007)")
    parametric: bool = Field(
        True, description="parametric priors (normal/inverse gamma); False: neuroCombat's non-parametric "
                          "Monte-Carlo-free integration over the other features")
    mean_only: bool = Field(False, description="adjust the site means only, never the scale")
    missing: Literal["available_case", "complete_scans"] = Field(
        "available_case", description="missing values: harmonize each feature on the scans that have it "
                                      "(available-case ComBat, as Fortin's and sva's ComBat) and keep a missing "
                                      "value missing; or complete_scans: refuse them (a table) or leave out a scan "
                                      "that lacks a measure (the lake)")
    covbat: bool = Field(
        False, description="after ComBat, harmonize the covariance of the features across sites too (CovBat, "
                           "Chen et al. 2022): the principal components of the ComBat residuals that explain "
                           "covbat_variance of their variance get each site's mean and scale removed")
    covbat_variance: float = Field(
        0.95, gt=0, lt=1, description="share of the residual variance whose principal components CovBat harmonizes")
    covariate_levels: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="names of a coded categorical covariate's levels, shown in reports instead of the codes, "
                    "e.g. SEX: {1: male, 2: female}")
    ref_batch: str | None = Field(
        None, description="reference batch: its values stay as measured and the others are brought onto "
                          "it (reference-batch ComBat, Zhang et al. 2018)")

    @field_validator("covariate_levels", mode="before")
    @classmethod
    def _level_codes_as_text(cls, value: Any) -> Any:
        """YAML reads ``1: male`` with an integer key; a level is its canonical text (1, 1.0 and '1'
        are one level, as the encoding reads them)."""
        if not isinstance(value, dict):
            return value
        return {str(c): ({_code(k): str(v) for k, v in names.items()} if isinstance(names, dict) else names)
                for c, names in value.items()}

    @model_validator(mode="after")
    def _smooth_are_covariates(self) -> "HarmonizationSettings":
        unknown = [t for t in self.smooth_terms + self.categorical_covariates + list(self.covariate_levels)
                   if t not in self.covariates]
        if unknown:
            raise ValueError(f"smooth_terms/categorical_covariates/covariate_levels {unknown} are not in covariates "
                             f"{self.covariates}")
        bad = [t for t, (lo, hi) in self.smooth_term_bounds.items() if t not in self.smooth_terms or not lo < hi]
        if bad:
            raise ValueError(f"smooth_term_bounds {bad}: each must be a smooth term with lower < upper")
        if self.repeated == "longitudinal" and (self.smooth_terms or self.ref_batch):
            raise ValueError("longitudinal ComBat here is linear without a reference batch: drop smooth_terms "
                             "and ref_batch, or fit one scan per subject")
        if self.covbat and (self.ref_batch or self.repeated == "longitudinal"):
            raise ValueError("CovBat (Chen et al. 2022) has no reference-batch or longitudinal form: drop covbat, "
                             "or ref_batch and repeated: longitudinal")
        if self.parametric is False and self.eb is False:
            raise ValueError("parametric=False chooses the non-parametric empirical Bayes priors: it needs eb=True")
        both = set(self.smooth_terms) & (set(self.categorical_covariates) | set(self.covariate_levels))
        if both:
            raise ValueError(f"{sorted(both)} cannot be both smooth and categorical")
        return self


def _code(key: Any) -> str:
    """A level code as the covariate encoding writes it: 2, 2.0 and '2' are '2'."""
    if isinstance(key, float) and key.is_integer():
        return str(int(key))
    return str(key)
