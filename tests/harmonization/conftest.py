"""ABIDE I for the harmonization tests: the table (20 sites, 1035 subjects) and its features with
AGE, SEX and DX as covariates. A module that needs another view of it defines its own ``abide``."""

from __future__ import annotations

import pandas as pd
import pytest

from harmonization.abide import constant_columns, load_abide
from harmonization.inputs import HarmonizationData, from_wide_table


@pytest.fixture(scope="module")
def abide(abide_data) -> pd.DataFrame:
    return load_abide(abide_data)


@pytest.fixture(scope="module")
def data(abide) -> HarmonizationData:
    return from_wide_table(abide, "SITE", ["AGE", "SEX", "DX"], exclude=["FILE_ID", *constant_columns(abide)])
