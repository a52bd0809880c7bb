"""Key acquisition parameters of every real series, classic, mosaic and enhanced.

Expected values are the ones the data's MANIFEST.md states for each series.
"""

from __future__ import annotations

import pytest

from tasks.conformance.parameters import scanner_identity, series_parameters
from tasks.intake.inventory import group_series, inventory_upload
from tests.data import shared_path

CASES = [
    # folder, TR ms, TE ms, TI ms, flip, thickness mm, rows, cols, slices, volumes, manufacturer
    (("dcm_qa_nih", "In", "20180918GE", "mr_0004"), 5000, 30, None, 60, 3, 64, 64, 15, 10, "GE MEDICAL SYSTEMS"),
    (("dcm_qa_nih", "In", "20180918Si", "mr_0003"), 2435.37, 50, None, 75, 3, 72, 72, 5, 2, "SIEMENS"),
    (("dcm_qa", "In"), 3000, 30, None, 76, 3, 64, 64, 35, 2, "SIEMENS"),
    (("dcm_qa_philips", "In"), 2000, 30, None, 90, 6, 64, 64, 9, 3, "Philips Medical Systems"),
    (("dcm_qa_philips_enh", "In"), 6.501, 2.93, None, 9, 1, 256, 256, 170, 1, "Philips"),
    (("dcm_qa_xa30", "In"), 1800, 2.41, 900, 9, 2, 128, 128, 96, 1, "Siemens Healthineers"),
]


@pytest.mark.parametrize("parts,tr,te,ti,fa,thick,rows,cols,slices,vols,man", CASES,
                         ids=[c[0][0] + "/" + c[0][-1] for c in CASES])
def test_series_parameters(parts, tr, te, ti, fa, thick, rows, cols, slices, vols, man):
    inv = inventory_upload(shared_path(*parts), keep_data=False)
    series = list(group_series(inv.accepted).values())
    assert len(series) == 1
    p = series_parameters([f.header for f in series[0]])
    assert p["repetition_time"] == pytest.approx(tr, abs=0.01)
    assert p["echo_time"] == pytest.approx(te, abs=0.01)
    assert (p["inversion_time"] is None) if ti is None else p["inversion_time"] == pytest.approx(ti)
    assert p["flip_angle"] == pytest.approx(fa)
    assert p["slice_thickness"] == pytest.approx(thick)
    assert (p["rows"], p["columns"], p["n_slices"], p["n_volumes"]) == (rows, cols, slices, vols)
    assert p["field_strength"] == pytest.approx(3.0)
    assert scanner_identity(series[0][0].header)["manufacturer"] == man
