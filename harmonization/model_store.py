"""Versioned ComBat models in the lake: ``models/harmonization/<model_id>/``.

A model folder holds ``arrays.npz`` (the estimates, read back with
``allow_pickle=False``: loading a model never runs code, unlike neuroHarmonize's
pickles) and ``model.json`` (everything else: batches and their N,
covariates and their encoding, spline knots, penalties, settings, software
versions, input fingerprint, findings). ``model.json`` is written last, so a
folder without it is an interrupted save and is never listed.

The id is derived from the content (:attr:`ComBatModel.model_id`), so saving
the same fit twice is a no-op where neuroHarmonize's ``saveHarmonizationModel``
refuses, and loading re-derives the id to prove nothing was edited.

A model fitted on a trial's lake rows records the trial (``trial_id`` in
``model.json``). One of them at a time is the trial's *promoted* model, the
one the nightly apply uses: ``models/harmonization/current/<trial_id>.json``
holds its id, the trial, when and by whom it was promoted and the model it
replaced. :func:`promote` writes it (audited ``model_promoted``) and refuses a
model that does not exist, is damaged, or belongs to another trial.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from harmonization import gam
from harmonization.combat import ComBatModel, Options
from harmonization.covbat import CovBat
from harmonization.errors import (
    HarmonizationError,
    ModelNotFoundError,
    ModelTrialError,
    PromotionError,
)
from harmonization.inputs import CovariateEncoding
from tasks.errors import TRANSIENT_RETRIES
from tasks.lake.audit import append_event
from tasks.lake.storage import Lake

ROOT = "models/harmonization"
CURRENT = f"{ROOT}/current"


class ModelIntegrityError(HarmonizationError):
    """A stored model whose content no longer matches its id."""


def model_dir(model_id: str) -> str:
    if not model_id.startswith("hm-") or "/" in model_id:
        raise ModelNotFoundError(f"{model_id!r} is not a harmonization model id (hm-<16 hex>)")
    return f"{ROOT}/{model_id}"


def save_model(lake: Lake, model: ComBatModel) -> str:
    """Store ``model``; returns its id. Saving an identical model again changes nothing."""
    model_id = model.model_id
    folder = model_dir(model_id)
    if lake.exists(f"{folder}/model.json"):
        load_model(lake, model_id)  # proves the stored copy is this very model
        return model_id
    buf = io.BytesIO()
    np.savez(buf, **model.arrays())
    lake.write_bytes(f"{folder}/arrays.npz", buf.getvalue())
    doc = dict(model.metadata, model_id=model_id)
    lake.write_text(f"{folder}/model.json", json.dumps(doc, indent=1, sort_keys=True, default=str))
    return model_id


def load_model(lake: Lake, model_id: str) -> ComBatModel:
    """The stored model ``model_id``.

    Raises
    ------
    ModelNotFoundError
        No complete model of that id; the message lists the stored ones.
    ModelIntegrityError
        The stored content does not hash to its id (edited or corrupted).
    """
    folder = model_dir(model_id)
    if not lake.exists(f"{folder}/model.json"):
        known = [m["model_id"] for m in list_models(lake)]
        raise ModelNotFoundError(f"no harmonization model {model_id} in {lake.uri(ROOT)}; stored: "
                                 + (", ".join(known) or "none"))
    meta = json.loads(lake.read_text(f"{folder}/model.json"))
    meta.pop("model_id", None)
    with np.load(io.BytesIO(lake.read_bytes(f"{folder}/arrays.npz")), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    model = from_parts(meta, arrays)
    if model.model_id != model_id:
        raise ModelIntegrityError(f"model {model_id} in {lake.uri(folder)} does not match its id "
                                  f"(content hashes to {model.model_id}): it was edited or damaged")
    return model


def from_parts(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ComBatModel:
    """Rebuild a model from its metadata and arrays."""
    batches = meta["batches"]
    return ComBatModel(
        batches=list(batches), batch_sizes=[int(n) for n in batches.values()],
        batch_map=dict(meta["batch_map"]), features=list(meta["features"]),
        encoding=CovariateEncoding.from_dict(meta["covariates"]),
        B_hat=arrays["B_hat"], grand_mean=arrays["grand_mean"], var_pooled=arrays["var_pooled"],
        gamma_star=arrays["gamma_star"], delta_star=arrays["delta_star"],
        gamma_hat=arrays["gamma_hat"], delta_hat=arrays["delta_hat"],
        eb=bool(meta["empirical_bayes"]), options=Options.from_dict(meta.get("options")),
        spline=gam.SplineSpec.from_dict(meta["spline"]) if "spline" in meta else None,
        alphas=arrays.get("alphas"), subjects=meta.get("longitudinal", {}).get("subjects"),
        intercepts=arrays.get("intercepts"),
        covbat=CovBat.from_parts(meta["covbat"], arrays) if "covbat" in meta else None, metadata=meta)


def list_models(lake: Lake) -> list[dict[str, Any]]:
    """A summary of every complete stored model, oldest first."""
    out = []
    for name in lake.listdir(ROOT):
        rel = f"{ROOT}/{name}/model.json"
        if not lake.exists(rel):
            continue
        meta = json.loads(lake.read_text(rel))
        out.append({"model_id": meta.get("model_id", name), "trial_id": meta.get("trial_id"),
                    "method": meta.get("method"),
                    "created_at": meta.get("created_at"), "batches": len(meta.get("batches", {})),
                    "features": len(meta.get("features", [])),
                    "rows": meta.get("input", {}).get("rows")})
    return sorted(out, key=lambda m: str(m["created_at"]))


@dataclass(frozen=True)
class Promotion:
    """A trial's promoted model: the pointer ``models/harmonization/current/<trial_id>.json``.

    Attributes
    ----------
    model_id, trial_id
        The model the nightly apply uses for the trial.
    promoted_at
        When (UTC, ISO 8601).
    actor
        Who promoted it (``--by``).
    previous
        The model it replaced, or None for the trial's first promotion.
    """

    model_id: str
    trial_id: str
    promoted_at: str
    actor: str
    previous: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for a person: which model, since when, by whom, replacing what."""
        return (f"trial {self.trial_id}: model {self.model_id}, promoted {self.promoted_at} by "
                f"{self.actor}" + (f" (replacing {self.previous})" if self.previous else ""))


def current_path(trial_id: str) -> str:
    """Where the trial's promoted-model pointer lives in the lake."""
    if not trial_id or "/" in trial_id or trial_id.startswith("."):
        raise PromotionError(f"{trial_id!r} is not a trial id")
    return f"{CURRENT}/{trial_id}.json"


def model_trial(model: ComBatModel) -> str | None:
    """The trial a model was fitted for (None: fitted on a table file, not on a trial's lake)."""
    trial = model.metadata.get("trial_id")
    return str(trial) if trial else None


def check_trial(model: ComBatModel, model_id: str, trial_id: str, strict: bool = True) -> None:
    """Refuse a model of another trial (``strict``: also one that records no trial).

    Raises
    ------
    ModelTrialError
        Naming both trials and what to do instead.
    """
    owner = model_trial(model)
    if owner == trial_id or (owner is None and not strict):
        return
    if owner is None:
        raise ModelTrialError(
            f"model {model_id} records no trial (it was fitted on a table file, not on trial "
            f"{trial_id}'s lake rows); fit one with `corelab harmonize fit --lake ... --trial ...`")
    raise ModelTrialError(f"model {model_id} belongs to trial {owner}, not to trial {trial_id}")


def current(lake: Lake, trial_id: str) -> Promotion | None:
    """The trial's promoted model, or None when none was promoted.

    Raises
    ------
    PromotionError
        The pointer exists but is not a promotion record (damaged or edited by hand).
    """
    rel = current_path(trial_id)
    if not lake.exists(rel):
        return None
    try:
        doc = json.loads(lake.read_text(rel))
        promotion = Promotion(**doc)
    except (ValueError, TypeError) as exc:
        raise PromotionError(f"{lake.uri(rel)}: not a promotion record ({exc}); promote the "
                             "model again with `corelab harmonize promote MODEL_ID`") from exc
    if promotion.trial_id != trial_id:
        raise PromotionError(f"{lake.uri(rel)} names trial {promotion.trial_id}, not {trial_id}")
    return promotion


def nothing_promoted(lake: Lake, trial_id: str) -> str:
    """What to tell a person when the trial has no promoted model, with what could be promoted."""
    mine = [m["model_id"] for m in list_models(lake) if m["trial_id"] == trial_id]
    return (f"no harmonization model is promoted for trial {trial_id}; stored models of this "
            f"trial: {', '.join(mine) or 'none'} (promote one with "
            "`corelab harmonize promote MODEL_ID`)")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def promote(lake: Lake, model_id: str, trial_id: str, actor: str) -> tuple[Promotion, bool]:
    """Make ``model_id`` the trial's promoted model; audited as ``model_promoted``.

    Returns the promotion and whether it changed anything (promoting the model
    that is already promoted rewrites nothing and logs nothing).

    Raises
    ------
    ModelNotFoundError
        No stored model of that id (the message lists the stored ones).
    ModelIntegrityError
        The stored model no longer matches its id.
    ModelTrialError
        The model was fitted for another trial, or on a table file.
    """
    check_trial(load_model(lake, model_id), model_id, trial_id)
    rel = current_path(trial_id)
    with lake.lock(f"harmonization-current-{trial_id}"):
        before = current(lake, trial_id)
        if before is not None and before.model_id == model_id:
            return before, False
        promotion = Promotion(model_id, trial_id, _now(), actor,
                              before.model_id if before else None)
        lake.write_text(rel, json.dumps(promotion.to_dict(), indent=1, sort_keys=True))
        append_event(lake, "model_promoted", actor=actor, model_id=model_id, trial_id=trial_id,
                     previous=promotion.previous, pointer=rel)
    return promotion, True


@task(name="read-promoted-model", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def current_task(lake: Lake, trial_id: str) -> Promotion | None:
    """Prefect wrapper of :func:`current` (retried: storage can fail transiently)."""
    return current(lake, trial_id)


@task(name="load-harmonization-model", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def load_model_task(lake: Lake, model_id: str) -> ComBatModel:
    """Prefect wrapper of :func:`load_model`."""
    return load_model(lake, model_id)
