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
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from harmonization import gam
from harmonization.combat import ComBatModel
from harmonization.errors import HarmonizationError, ModelNotFoundError
from harmonization.inputs import CovariateEncoding
from tasks.errors import TRANSIENT_RETRIES
from tasks.lake.storage import Lake

ROOT = "models/harmonization"


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
        eb=bool(meta["empirical_bayes"]),
        spline=gam.SplineSpec.from_dict(meta["spline"]) if "spline" in meta else None,
        alphas=arrays.get("alphas"), metadata=meta)


def list_models(lake: Lake) -> list[dict[str, Any]]:
    """A summary of every complete stored model, oldest first."""
    out = []
    for name in lake.listdir(ROOT):
        rel = f"{ROOT}/{name}/model.json"
        if not lake.exists(rel):
            continue
        meta = json.loads(lake.read_text(rel))
        out.append({"model_id": meta.get("model_id", name), "method": meta.get("method"),
                    "created_at": meta.get("created_at"), "batches": len(meta.get("batches", {})),
                    "features": len(meta.get("features", [])),
                    "rows": meta.get("input", {}).get("rows")})
    return sorted(out, key=lambda m: str(m["created_at"]))


@task(name="load-harmonization-model", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def load_model_task(lake: Lake, model_id: str) -> ComBatModel:
    """Prefect wrapper of :func:`load_model`."""
    return load_model(lake, model_id)
