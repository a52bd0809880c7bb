"""Contracts between stages: the trial configuration and the table schemas.

trial                   TrialConfig (pydantic, loaded from YAML): sites, protocol, visits, options
qc_settings             the ``qc:`` section: gate rules, per-site overrides, robust z-score
harmonization_settings  the ``harmonization:`` section
schemas                 one versioned pyarrow schema per Parquet table of the lake
examples/               example trial files (``shared_data_trial.yaml``: one site per vendor folder)
"""

from importlib import resources
from pathlib import Path

EXAMPLE_TRIAL = "shared_data_trial.yaml"


def example_path(name: str = EXAMPLE_TRIAL) -> Path:
    """Path of an example trial file shipped with the package."""
    return Path(str(resources.files("data_contracts") / "examples" / name))
