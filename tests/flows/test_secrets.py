"""Secrets reach a worker through its environment or a Prefect Secret block, never a parameter."""

from __future__ import annotations

import pytest

from flows.runtime import load_secrets, secret_block_name, trial_secrets

pytestmark = pytest.mark.prefect


def test_a_missing_secret_is_read_from_its_prefect_secret_block(prefect_harness, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("CORELAB_DEID_KEY", raising=False)
    monkeypatch.delenv("CORELAB_AUDIT_KEY", raising=False)
    Secret(value="a-key-kept-by-prefect").save(secret_block_name("CORELAB_DEID_KEY"), overwrite=True)
    assert secret_block_name("CORELAB_DEID_KEY") == "corelab-deid-key"
    assert load_secrets(("CORELAB_DEID_KEY", "CORELAB_AUDIT_KEY")) == ["CORELAB_DEID_KEY"]
    import os

    assert os.environ["CORELAB_DEID_KEY"] == "a-key-kept-by-prefect"
    assert "CORELAB_AUDIT_KEY" not in os.environ           # no block: left unset, the run says what is missing
    monkeypatch.setenv("CORELAB_DEID_KEY", "from-the-environment")
    assert load_secrets(("CORELAB_DEID_KEY",)) == []        # the environment wins
    assert os.environ["CORELAB_DEID_KEY"] == "from-the-environment"


def test_a_trial_names_the_secrets_it_needs(trial):
    assert trial_secrets(trial, "lake") == (trial.deidentification.secret_env, "CORELAB_AUDIT_KEY",
                                            *([trial.subjects.secret_env] if trial.subjects.mode == "pseudonym"
                                              else []))
    assert trial_secrets(trial, "s3://bucket/lake")[-2:] == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
