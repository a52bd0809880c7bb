"""The one BIDS entity table of corelab: every BIDS file name we write or read goes through it.

The table itself (:mod:`data_contracts._bids_entities`) is generated from the BIDS schema that
bidsschematools ships. Conversion (``tasks/bids``), pipeline specs (``pipelines/spec.py``) and
the reading of derivatives (``tasks/run``) all name files with :func:`entity_prefix` and read
them with :func:`parse_entities`. The anat container keeps its own copy of the few entities it
accepts (``pipelines/anat/derivatives.py``, hashed into its image); a test proves they agree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from data_contracts._bids_entities import ENTITIES, SCHEMA_BIDS_VERSION

# What corelab's datasets declare as their BIDSVersion. Every entity they use has the same key,
# order and format in BIDS 1.10.0 as in the generated table (SCHEMA_BIDS_VERSION, tested); the
# official validator (bids-validator-deno 3.0.2, schema 1.11.1) warns UNKNOWN_BIDS_VERSION for
# a dataset that claims a version newer than its own schema, so the claim moves only with it.
BIDS_VERSION = "1.10.0"
__all__ = ["BIDS_VERSION", "ENTITY_ORDER", "EntityError", "LABEL", "SCHEMA_BIDS_VERSION", "check_value",
           "entity_prefix", "parse_entities"]

ENTITY_ORDER: tuple[str, ...] = tuple(key for key, *_ in ENTITIES)
FORMAT: dict[str, str] = {key: fmt for key, _, fmt, _ in ENTITIES}
ALLOWED: dict[str, tuple[str, ...]] = {key: enum for key, _, _, enum in ENTITIES if enum}
NAME: dict[str, str] = {key: name for key, name, _, _ in ENTITIES}
LABEL = r"^[A-Za-z0-9]+$"                  # BIDS "label": alphanumeric
_LABEL = re.compile(LABEL)
_INDEX = re.compile(r"^[0-9]+$")           # BIDS "index": a non-negative integer
_PAIR = re.compile(r"^([a-z]+)-(.+)$")


class EntityError(ValueError):
    """An entity the table does not know, or a value its format does not allow."""


def check_value(key: str, value: object) -> str:
    """The value as it is written in a file name (an index without leading zeros)."""
    if key not in FORMAT:
        raise EntityError(f"unknown BIDS entity {key!r} (BIDS {SCHEMA_BIDS_VERSION} entity table)")
    text = str(value)
    if FORMAT[key] == "index":
        if not _INDEX.match(text):
            raise EntityError(f"BIDS {NAME[key]} ({key}) {text!r} must be digits only")
        return str(int(text))
    if not _LABEL.match(text):
        raise EntityError(f"BIDS {NAME[key]} ({key}) {text!r} must be letters and digits only")
    if key in ALLOWED and text not in ALLOWED[key]:
        raise EntityError(f"BIDS {NAME[key]} ({key}) {text!r} is not one of {list(ALLOWED[key])}")
    return text


def entity_prefix(subject: str, session: str, entities: Mapping[str, object] | None = None) -> str:
    """``sub-S_ses-V[_<key>-<value> ...]`` in the order of the entity table (values checked)."""
    given = {k: v for k, v in (entities or {}).items() if v is not None}
    if {"sub", "ses"} & set(given):
        raise EntityError("subject and session are arguments of entity_prefix, not entities to pass")
    parts = {"sub": subject, "ses": session, **given}
    unknown = sorted(set(parts) - set(ENTITY_ORDER))
    if unknown:
        raise EntityError(f"unknown BIDS entities {unknown} (BIDS {SCHEMA_BIDS_VERSION} entity table)")
    return "_".join(f"{k}-{check_value(k, parts[k])}" for k in ENTITY_ORDER if k in parts)


def parse_entities(filename: str) -> dict[str, str]:
    """Every ``key-value`` entity of a BIDS file name (path and suffix ignored), in name order."""
    stem = filename.rsplit("/", 1)[-1].split(".", 1)[0]
    out = {}
    for token in stem.split("_")[:-1]:                 # the last token is the suffix
        m = _PAIR.match(token)
        if m is None or m.group(1) not in FORMAT:
            raise EntityError(f"{filename}: {token!r} is not a BIDS entity")
        out[m.group(1)] = m.group(2)
    return out
