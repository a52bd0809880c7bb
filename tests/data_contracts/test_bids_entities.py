"""The one BIDS entity table: generated from bidsschematools, and the anat container's copy agrees."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from data_contracts import _gen_bids_entities
from data_contracts.bids import ENTITY_ORDER, EntityError, entity_prefix, parse_entities
from pipelines.anat.derivatives import OPTIONAL_ENTITIES, file_prefix

# BIDS 1.10.0, Appendix "Entity table", the version corelab's datasets declare.
BIDS_1_10_0 = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
    "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
    "recording", "chunk", "seg", "res", "den", "label", "desc",
)


def test_the_table_is_what_the_generator_makes_from_the_installed_schema():
    generated = Path(_gen_bids_entities.__file__).with_name("_bids_entities.py").read_text()
    assert generated == _gen_bids_entities.generate()


def test_every_entity_of_the_declared_version_keeps_its_order():
    assert set(BIDS_1_10_0) <= set(ENTITY_ORDER)
    assert [k for k in ENTITY_ORDER if k in BIDS_1_10_0] == list(BIDS_1_10_0)


def test_names_are_built_in_table_order_with_checked_values():
    assert entity_prefix("S1", "v1", {"run": "02", "task": "rest", "acq": "fast", "echo": None}) == \
        "sub-S1_ses-v1_task-rest_acq-fast_run-2"
    for bad, match in (({"run": "2a"}, "digits"), ({"acq": "a_b"}, "letters and digits"),
                       ({"part": "complex"}, "not one of"), ({"colour": "red"}, "unknown BIDS entities")):
        with pytest.raises(EntityError, match=match):
            entity_prefix("S1", "v1", bad)


def test_parse_reads_back_what_was_built():
    name = entity_prefix("S1", "v1", {"ce": "gad", "acq": "fast", "run": "1"}) + "_T1w.nii.gz"
    assert parse_entities(f"bids/sub-S1/ses-v1/anat/{name}") == {"sub": "S1", "ses": "v1", "acq": "fast",
                                                                  "ce": "gad", "run": "1"}
    with pytest.raises(EntityError, match="'foo' is not a BIDS entity"):
        parse_entities("sub-1_foo_T1w.nii.gz")


def test_the_anat_containers_own_copy_agrees_with_the_table():
    """pipelines/anat is hashed into its image, so it keeps its few entities itself: the same ones."""
    assert [k for k in ENTITY_ORDER if k in OPTIONAL_ENTITIES] == list(OPTIONAL_ENTITIES)
    values = {"acq": "fast", "ce": "gad", "rec": "norm", "run": "3"}
    for n in range(len(OPTIONAL_ENTITIES) + 1):
        for keys in itertools.combinations(OPTIONAL_ENTITIES, n):
            entities = {k: values[k] for k in keys}
            assert file_prefix("S1", "v1", entities) == entity_prefix("S1", "v1", entities), entities
