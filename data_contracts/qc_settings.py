"""QC thresholds of a trial (the ``qc:`` section of TrialConfig): defaults, per-site overrides,
and the site's own distribution."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Rule(BaseModel):
    """Limits of one metric: WARN beyond the warn limits, FAIL beyond the fail limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warn_below: float | None = None
    fail_below: float | None = None
    warn_above: float | None = None
    fail_above: float | None = None
    better: Literal["higher", "lower", "range"] = Field(
        "range", description="which way is better (the robust z-score only flags the worse side)")

    @model_validator(mode="after")
    def _ordered(self) -> "Rule":
        if None not in (self.warn_below, self.fail_below) and self.fail_below > self.warn_below:
            raise ValueError("fail_below must not be above warn_below")
        if None not in (self.warn_above, self.fail_above) and self.fail_above < self.warn_above:
            raise ValueError("fail_above must not be below warn_above")
        return self


# The groups of image QC metrics a pipeline spec can ask for (PipelineSpec.image_qc): the metrics
# of each (tasks/qc/metrics.py computes them) and the pipeline outputs, by key, each is computed
# from beside the raw image. A spec that asks for a group must declare those outputs.
IMAGE_QC_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "head": (("efc", "fber", "fov_cut"), ()),
    "tissue": (("snr_gm", "snr_wm", "cnr", "cjv", "wm2max"), ("preproc", "brain_mask", "probseg_GM", "probseg_WM")),
    "volumes": (("tiv_cm3", "gm_fraction", "wm_fraction", "csf_fraction"),
                ("brain_mask", "probseg_GM", "probseg_WM", "probseg_CSF")),
}

# Defaults for the built-in anat pipeline on a 3 T T1w, set with bench/qc_calibration.py from
# the three real T1s of ../shared/data (Philips 1 mm, Siemens XA30 2 mm, chris_t1 0.88 mm), which
# must pass, and the same T1s with heavy noise or their top 30 % cut, which must not. Each trial
# can override them (globally or per site).
DEFAULT_RULES: dict[str, Rule] = {
    "coverage": Rule(warn_below=0.97, fail_below=0.90, better="higher"),
    "fov_cut": Rule(warn_above=0.15, fail_above=0.30, better="lower"),
    "snr_wm": Rule(warn_below=5.0, fail_below=3.0, better="higher"),
    "snr_gm": Rule(warn_below=3.5, fail_below=2.0, better="higher"),
    "cnr": Rule(warn_below=1.2, fail_below=0.7, better="higher"),
    "cjv": Rule(warn_above=0.9, fail_above=1.5, better="lower"),
    "efc": Rule(warn_above=0.75, fail_above=0.90, better="lower"),
    "fber": Rule(warn_below=20.0, fail_below=5.0, better="higher"),
    "wm2max": Rule(warn_below=0.15, fail_below=0.05, warn_above=1.0, better="range"),
    "inu_range": Rule(warn_above=0.6, fail_above=1.0, better="lower"),
    # Is it a head (pipelines/anat/headcheck.py). bench/qc_calibration.py on anat 0.1.2: the real
    # heads give correlations 0.36-0.57, tissue order 0.21-0.28 and scalp margins 16-21 mm (13.5
    # under a simulated scanner change). Each non-head made from them (tests/pipelines/nonheads.py)
    # that registration does not refuse fails one at least: correlations 0.13 or less; tissue order
    # below 0, but 0.11 for a bottle phantom; margins 3-11 mm, but 16-18 mm for an inverted head
    # and 54 mm for the phantom. The skull-stripped MNI152 (correlation 0.98) fails on its 1 mm margin.
    "template_correlation": Rule(warn_below=0.30, fail_below=0.20, better="higher"),
    "tissue_order": Rule(warn_below=0.10, fail_below=0.05, better="higher"),
    "scalp_margin_mm": Rule(warn_below=11.0, fail_below=9.0, better="higher"),
    "tiv_cm3": Rule(warn_below=1100, fail_below=800, warn_above=2000, fail_above=2500),
    "gm_fraction": Rule(warn_below=0.30, fail_below=0.20, warn_above=0.65, fail_above=0.75),
    "wm_fraction": Rule(warn_below=0.20, fail_below=0.10, warn_above=0.55, fail_above=0.65),
    "csf_fraction": Rule(warn_below=0.05, fail_below=0.02, warn_above=0.45, fail_above=0.60),
    # The dwi pipeline (pipelines/dwi). The Philips 12-direction DWI of ../shared/data (2 mm): mean
    # displacement 0.33 mm, max 0.60; no dropout slice; tensor residual 0.023; FA in CSF 0.14; the
    # best axis flip of its table 0.023 less coherent than the table (planted flips: 0.031-0.052
    # more). Motion limits in voxels of 2 mm: one voxel warns, two fail.
    "dwi_mean_displacement_mm": Rule(warn_above=1.0, fail_above=2.0, better="lower"),
    "dwi_max_displacement_mm": Rule(warn_above=2.0, fail_above=4.0, better="lower"),
    "dwi_dropout_slices": Rule(warn_above=0.5, fail_above=3.5, better="lower"),
    "dwi_tensor_residual": Rule(warn_above=0.05, fail_above=0.08, better="lower"),
    "dwi_fa_csf": Rule(warn_above=0.25, fail_above=0.35, better="lower"),
    "dwi_gradient_flip_gain": Rule(warn_above=0.0, fail_above=0.015, better="lower"),
    # The session's T1 was given but its white matter does not fit the DWI (FA contrast below 1.5,
    # pipelines/dwi/anatomy.py): the FA-threshold measures stand; a reviewer looks at why.
    "dwi_t1w_rejected": Rule(warn_above=0.5, better="lower"),
    # The bold QC pipeline (pipelines/bold). Motion limits from Parkes et al. 2018 (NeuroImage 171:
    # 415): mean FD above 0.25 mm is their stringent exclusion, above 0.55 mm their lenient one, and
    # more than 20 % of volumes over 0.2 mm FD (MRIQC's threshold) their stringent one (a warning
    # here: a phantom's FD is noise, 0.05-0.33 mm on the XA60/XA61 phantoms of ../shared/data). A
    # volume no rigid fit can place (its slices moved apart) fails the series, as does a tSNR below
    # 5 (the GE series of ../shared/data, its volunteer moving throughout: 2.2; the phantoms 10-45).
    # SliceTiming that contradicts the series fails (slice-timing correction would use it); none at
    # all warns (Philips writes none).
    "bold_fd_mean": Rule(warn_above=0.25, fail_above=0.55, better="lower"),
    "bold_fd_perc": Rule(warn_above=20.0, better="lower"),
    "bold_realign_failed": Rule(fail_above=0.5, better="lower"),
    "bold_tsnr": Rule(warn_below=20.0, fail_below=5.0, better="higher"),
    "bold_slice_timing_errors": Rule(fail_above=0.5, better="lower"),
    "bold_slice_timing_absent": Rule(warn_above=0.5, better="lower"),
}


#: The metrics that say whether the object is a head. A limit of theirs is reason ``not_a_head``
#: (not ``qc_limit``), and a reviewer who passes a series failed on one must say so.
HEAD_CHECK: tuple[str, ...] = ("template_correlation", "tissue_order", "scalp_margin_mm")


def limit_code(metric: str) -> str:
    """The reason code of a metric beyond a limit of the trial's rules."""
    return "not_a_head" if metric in HEAD_CHECK else "qc_limit"


class RobustZ(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_n: int = Field(10, ge=3, description="scans a site needs before its own distribution counts")
    warn: float = Field(3.0, gt=0, description="|z| from the site's median/MAD that warns")
    fail: float = Field(5.0, gt=0, description="|z| that fails")


class QCSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: dict[str, Rule] = Field(default_factory=dict, description="overrides of the default rules")
    site_rules: dict[str, dict[str, Rule]] = Field(default_factory=dict, description="per-site overrides")
    robust_z: RobustZ = Field(default_factory=RobustZ)

    def rules_for(self, site: str) -> dict[str, Rule]:
        return {**DEFAULT_RULES, **self.rules, **self.site_rules.get(site, {})}
