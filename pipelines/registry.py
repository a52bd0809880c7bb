"""The built-in pipeline specs, by name.

Each spec names its image by key in ``containers/lock``; the runner turns it into a command.
The pipeline modules are imported when a spec is asked for, not when this module is, so the
registry can be listed without loading the pipelines' scientific stack.
"""

from __future__ import annotations

from pipelines.spec import BidsQuery, PipelineSpec


class UnknownPipeline(KeyError):
    """No built-in pipeline (or image) has that name."""


def anat_spec() -> PipelineSpec:
    """The built-in anatomical pipeline (``pipelines/anat``) in image ``anat``."""
    from pipelines import anat

    # Output names as pipelines/anat/derivatives.py writes them below the derivatives root.
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
        outputs=(
            "dataset_description.json",
            f"{anat_dir}_desc-preproc_T1w.nii.gz",
            f"{anat_dir}_desc-biasfield_T1w.nii.gz",
            f"{anat_dir}_desc-brain_mask.nii.gz",
            f"{anat_dir}_dseg.nii.gz",
            f"{anat_dir}_label-GM_probseg.nii.gz",
            f"{anat_dir}_label-WM_probseg.nii.gz",
            f"{anat_dir}_label-CSF_probseg.nii.gz",
            "sub-{subject}/figures/{prefix}_desc-dseg_T1w.png",
            f"{anat_dir}_desc-volumes_measures.tsv",
        ),
        sources=("pipelines/anat",),
    )


BUILTIN = {"anat": anat_spec}


def get_spec(name: str) -> PipelineSpec:
    """The built-in spec called ``name``."""
    if name not in BUILTIN:
        raise UnknownPipeline(f"no built-in pipeline {name!r}; known: {sorted(BUILTIN)}")
    return BUILTIN[name]()


def spec_for_image(key: str) -> PipelineSpec:
    """The built-in spec whose image is ``key`` (one image per pipeline here)."""
    for make in BUILTIN.values():
        spec = make()
        if spec.image == key:
            return spec
    raise UnknownPipeline(f"no built-in pipeline uses image {key!r}")
