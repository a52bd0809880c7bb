"""The pipelines corelab knows, by name: the built-in ones, and any registered beside them.

Each spec names its image by key in its lock; the runner turns it into a command. The pipeline
modules are imported when a spec is asked for, not when this module is, so the registry can be
listed without loading the pipelines' scientific stack.

A pipeline shipped elsewhere (a site's own package) registers a factory with :func:`register`
before the flows run; nothing under ``tasks/`` changes for it.
"""

from __future__ import annotations

from collections.abc import Callable

from data_contracts.qc_settings import HEAD_CHECK
from pipelines.spec import BidsQuery, Measure, PipelineSpec, SidecarMetric, Upstream


class UnknownPipeline(KeyError):
    """No registered pipeline (or image) has that name."""


def anat_spec() -> PipelineSpec:
    """The built-in anatomical pipeline (``pipelines/anat``) in image ``anat``."""
    from pipelines import anat

    # Output names as pipelines/anat/derivatives.py writes them below the derivatives root, by
    # the keys of its own output_names(); the measures are pipelines/anat/process.py MEASURES
    # (a test keeps both equal to the pipeline's, which a change would need a rebuild for).
    anat_dir = "sub-{subject}/ses-{session}/anat/{prefix}"
    return PipelineSpec(
        name=anat.NAME,
        version=anat.VERSION,
        image="anat",
        command=("python", "-m", "pipelines.anat", "--input", "{input}",
                 "--output-dir", "{output_dir}", "--subject", "{subject}", "--session", "{session}"),
        options={"acq": "--acq", "run": "--run", "container_digest": "--container-digest",
                 "threads": "--threads"},
        inputs=(BidsQuery(datatype="anat", suffix="T1w"),),
        outputs={
            "dataset_description": "dataset_description.json",
            "preproc": f"{anat_dir}_desc-preproc_T1w.nii.gz",
            "bias_field": f"{anat_dir}_desc-biasfield_T1w.nii.gz",
            "brain_mask": f"{anat_dir}_desc-brain_mask.nii.gz",
            "dseg": f"{anat_dir}_dseg.nii.gz",
            "probseg_GM": f"{anat_dir}_label-GM_probseg.nii.gz",
            "probseg_WM": f"{anat_dir}_label-WM_probseg.nii.gz",
            "probseg_CSF": f"{anat_dir}_label-CSF_probseg.nii.gz",
            "figure": "sub-{subject}/figures/{prefix}_desc-dseg_T1w.png",
            "measures": f"{anat_dir}_desc-volumes_measures.tsv",
        },
        measures=(
            Measure("TIV", "mm3", "total intracranial volume: the brain mask "
                                  "(template intracranial mask warped to the subject)"),
            Measure("GM", "mm3", "grey matter volume: sum of GM posteriors in the brain mask"),
            Measure("WM", "mm3", "white matter volume: sum of WM posteriors in the brain mask"),
            Measure("CSF", "mm3", "cerebrospinal fluid volume: sum of CSF posteriors in the brain mask"),
            Measure("GM_fraction", "1", "GM volume divided by TIV"),
        ),
        image_qc=("head", "tissue", "volumes"),
        qc_sidecar="measures",
        qc_metrics=(SidecarMetric("coverage", "template_brain_in_fov"),
                    SidecarMetric("inu_range", "bias_field.p95", minus="bias_field.p05"),
                    *(SidecarMetric(name, f"head_check.{name}") for name in HEAD_CHECK)),
        bids_ignore=("sub-*/figures", "*_measures.tsv", "*_measures.json"),
        sources=("pipelines/anat",),
    )


def dwi_spec() -> PipelineSpec:
    """The built-in diffusion pipeline (``pipelines/dwi``) in image ``dwi``.

    Its sources include ``pipelines/anat``: the dwi pipeline writes its derivatives with anat's
    dataset helpers, so the image's wheel holds both folders and a change to either marks it stale.
    """
    from pipelines import dwi
    from pipelines.dwi.process import MEASURES, OPTIONAL_MEASURES
    from pipelines.dwi.run import PARAMS

    base = "sub-{subject}/ses-{session}/dwi/{prefix}"
    return PipelineSpec(
        name=dwi.NAME,
        version=dwi.VERSION,
        image="dwi",
        command=("python", "-m", "pipelines.dwi", "--input", "{input}",
                 "--output-dir", "{output_dir}", "--subject", "{subject}", "--session", "{session}"),
        options={"acq": "--acq", "rec": "--rec", "dir": "--dir", "run": "--run",
                 "container_digest": "--container-digest", "threads": "--threads"},
        inputs=(BidsQuery(datatype="dwi", suffix="dwi"),),
        outputs={
            "dataset_description": "dataset_description.json",
            "brain_mask": f"{base}_desc-brain_mask.nii.gz",
            "wm_mask": f"{base}_label-WM_mask.nii.gz",
            "b0": f"{base}_desc-b0_dwiref.nii.gz",
            **{p: f"{base}_model-tensor_param-{p}_dwimap.nii.gz" for p in PARAMS},
            "measures": f"{base}_desc-tensor_measures.tsv",
        },
        measures=tuple(Measure(name, unit, text, optional=name in OPTIONAL_MEASURES)
                       for name, (unit, text) in MEASURES.items()),
        qc_sidecar="measures",
        qc_metrics=(SidecarMetric("dwi_directions", "directions"),
                    SidecarMetric("dwi_t1w_rejected", "t1w_rejected"),
                    SidecarMetric("dwi_mean_displacement_mm", "motion.mean_displacement_mm"),
                    SidecarMetric("dwi_max_displacement_mm", "motion.max_displacement_mm"),
                    SidecarMetric("dwi_dropout_slices", "dropout_slices"),
                    SidecarMetric("dwi_tensor_residual", "tensor_residual"),
                    SidecarMetric("dwi_fa_csf", "fa_csf"),
                    SidecarMetric("dwi_gradient_flip_gain", "gradient_flip_gain_max")),
        bids_ignore=("*_dwimap.*", "*_dwiref.*", "*_measures.tsv", "*_measures.json"),
        upstream=(Upstream("t1w", "anat", "preproc", "--t1w"), Upstream("t1w_dseg", "anat", "dseg", "--t1w-dseg")),
        sources=("pipelines/dwi", "pipelines/anat"),
    )


def bold_spec() -> PipelineSpec:
    """The built-in functional QC pipeline (``pipelines/bold``) in image ``bold``.

    Its sources include ``pipelines/anat`` for the same reason as dwi's (anat's dataset helpers).
    """
    from pipelines import bold
    from pipelines.bold.process import MEASURES

    base = "sub-{subject}/ses-{session}/func/{prefix}"
    return PipelineSpec(
        name=bold.NAME,
        version=bold.VERSION,
        image="bold",
        command=("python", "-m", "pipelines.bold", "--input", "{input}",
                 "--output-dir", "{output_dir}", "--subject", "{subject}", "--session", "{session}"),
        options={"task": "--task", "acq": "--acq", "ce": "--ce", "rec": "--rec", "dir": "--dir", "run": "--run",
                 "echo": "--echo", "container_digest": "--container-digest", "threads": "--threads"},
        inputs=(BidsQuery(datatype="func", suffix="bold"),),
        outputs={
            "dataset_description": "dataset_description.json",
            "brain_mask": f"{base}_desc-brain_mask.nii.gz",
            "boldref": f"{base}_desc-mean_boldref.nii.gz",
            "tsnr": f"{base}_stat-tsnr_boldmap.nii.gz",
            "confounds": f"{base}_desc-confounds_timeseries.tsv",
            "figure": "sub-{subject}/figures/{prefix}_desc-carpet_bold.png",
            "measures": f"{base}_desc-qc_measures.tsv",
        },
        measures=tuple(Measure(name, unit, text) for name, (unit, text) in MEASURES.items()),
        qc_sidecar="measures",
        qc_metrics=(SidecarMetric("bold_fd_mean", "fd_mean"),
                    SidecarMetric("bold_fd_perc", "fd_perc"),
                    SidecarMetric("bold_realign_failed", "realign_failed"),
                    SidecarMetric("bold_tsnr", "tsnr"),
                    SidecarMetric("bold_dvars_std", "dvars_std"),
                    SidecarMetric("bold_gsr_x", "gsr_x"),
                    SidecarMetric("bold_gsr_y", "gsr_y"),
                    SidecarMetric("bold_aor", "aor"),
                    SidecarMetric("bold_aqi", "aqi"),
                    SidecarMetric("bold_gcor", "gcor"),
                    SidecarMetric("bold_carpet_spikes", "carpet_spikes"),
                    SidecarMetric("bold_slice_timing_errors", "slice_timing_errors"),
                    SidecarMetric("bold_slice_timing_absent", "slice_timing_absent"),
                    SidecarMetric("bold_volumes", "volumes")),
        bids_ignore=("sub-*/figures", "*_boldmap.*", "*_boldref.*", "*_timeseries.*",
                     "*_measures.tsv", "*_measures.json"),
        sources=("pipelines/bold", "pipelines/anat"),
    )


BUILTIN: dict[str, Callable[[], PipelineSpec]] = {"anat": anat_spec, "dwi": dwi_spec, "bold": bold_spec}


def register(name: str, factory: Callable[[], PipelineSpec]) -> None:
    """Make a pipeline known by name (a second registration of a name replaces the first)."""
    BUILTIN[name] = factory


def names() -> list[str]:
    """The registered pipelines, sorted."""
    return sorted(BUILTIN)


def get_spec(name: str) -> PipelineSpec:
    """The spec registered as ``name``."""
    if name not in BUILTIN:
        raise UnknownPipeline(f"no pipeline {name!r}; known: {names()}")
    return BUILTIN[name]()


def spec_for_image(key: str) -> PipelineSpec:
    """The registered spec whose image is ``key`` (one image per pipeline here)."""
    for make in BUILTIN.values():
        spec = make()
        if spec.image == key:
            return spec
    raise UnknownPipeline(f"no registered pipeline uses image {key!r}")
