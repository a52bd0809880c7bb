"""Draft a protocol section from a site's qualification scan.

Like mrQA's reference-protocol inference: each series of the scan becomes a
series type whose recognition pattern is its description and whose tolerances
are centred on the values it was acquired with. The output is a draft for
the imaging physicist to edit and lock, never a protocol by itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from data_contracts.trial import vendor_of
from tasks.conformance.parameters import scanner_identity, series_parameters
from tasks.intake.inventory import InventoryError, group_series, inventory_upload

# Default half-widths of the tolerance around an observed value.
SLACK = {
    "field_strength": ("abs", 0.1), "repetition_time": ("rel", 0.02), "echo_time": ("rel", 0.05),
    "inversion_time": ("rel", 0.02), "flip_angle": ("abs", 1.0), "slice_thickness": ("abs", 0.1),
    "pixel_spacing": ("rel", 0.05), "n_slices": ("abs", 0), "coverage_mm": ("rel", 0.1),
}


def _guess_datatype(desc: str, params: dict[str, Any]) -> tuple[str, str]:
    d = desc.lower()
    if re.search(r"dwi|dti|diff", d):
        return "dwi", "dwi"
    if re.search(r"bold|fmri|rest|task", d):
        return "func", "bold"
    if re.search(r"flair", d):
        return "anat", "FLAIR"
    if re.search(r"t2", d):
        return "anat", "T2w"
    if params.get("mr_acquisition_type") == "3D" or re.search(r"t1|mprage|tfl|spgr", d):
        return "anat", "T1w"
    if (params.get("n_volumes") or 1) > 1:
        return "func", "bold"
    return "anat", "T1w"


def _name(desc: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "_", desc).strip("_") or "series"
    name, i = base, 2
    while name in used:
        name, i = f"{base}_{i}", i + 1
    used.add(name)
    return name


def infer_protocol(upload: Path, visit: str = "baseline") -> dict[str, Any]:
    """A ``protocol:`` section (as a dict) drafted from the series of ``upload``."""
    inv = inventory_upload(upload, keep_data=False)
    if not inv.accepted:
        raise InventoryError("not_dicom", f"{upload}: no readable DICOM series to infer a protocol from")
    used: set[str] = set()
    types = []
    for members in group_series(inv.accepted).values():
        headers = [m.header for m in members]
        h = headers[0]
        desc = str(h.get("SeriesDescription", "") or h.get("ProtocolName", "") or "")
        params = series_parameters(headers)
        vendor = vendor_of(scanner_identity(h)["manufacturer"])
        datatype, suffix = _guess_datatype(desc, params)
        tolerances: dict[str, dict[str, float]] = {}
        for p, (kind, width) in SLACK.items():
            v = params.get(p)
            if v is not None:
                tolerances[p] = {"value": round(float(v), 4), kind: width}
        st: dict[str, Any] = {
            "name": _name(desc, used), "datatype": datatype, "suffix": suffix,
            "match": {"description": [desc.lower()] if desc else [],
                      "parameters": {"mr_acquisition_type": {"one_of": [params["mr_acquisition_type"]]}}
                      if params.get("mr_acquisition_type") else {}},
            "required": {"visits": [visit]},
        }
        if vendor:
            st["vendor_tolerances"] = {vendor: tolerances}
        else:
            st["tolerances"] = tolerances
        types.append(st)
    return {"protocol": {"series_types": types}}


def dump_protocol(section: dict[str, Any]) -> str:
    header = "# Drafted by `corelab protocol infer` from a qualification scan: review every tolerance.\n"
    return header + yaml.safe_dump(section, sort_keys=False, default_flow_style=None, width=100)
