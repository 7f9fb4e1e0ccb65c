"""The scoring stage of a bulk job, as Ray Data runs it: ``BatchScorer`` (a callable class: one per actor,
the model loaded once, batches of prepared images -> result rows), and the driver's check before it. The
engine, the profile and the verdicts are the service's own (app/engine); nothing here re-implements them.
The decode stage is decode.py."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from app.bootstrap import apply_thread_policy, engine_from_settings
from app.bulk.decode import InputSpec
from app.bulk.output import SCHEMA
from app.engine.calibration.profile import Profile, served_key
from app.engine.calibration.store import ProfileStore
from app.engine.preprocessing import PreparedImage
from app.engine.types import Verdict
from app.errors import ProfileMismatch
from app.settings import Settings


def driver_check(settings: Settings, profile_name: str) -> tuple[InputSpec, dict[str, Any]]:
    """Before any cluster work: load the model on the driver's CPU (no warm-up, no export) for its id and
    input transform, and the profile as ``ddm-anomaly score`` loads it (bound to that model and the method
    options); a mismatch fails here, not in every actor. Returns the decode spec and the profile document
    the actors judge with (so the workers need no profiles folder)."""
    probe = settings.model_copy(update={"device": "cpu", "dtype": "float32", "runtime": "torch"})
    engine = engine_from_settings(probe)
    engine.load(warmup_batch=0)
    store = ProfileStore(settings.profiles_folder, engine.info.model_id, engine.options)
    profile = store.get(profile_name)
    return InputSpec.of(engine, settings), profile.to_dict()


class BatchScorer:
    """One per actor (Ray Data's ``map_batches`` with an actor pool): the engine loaded once, under the
    process's thread policy; each call scores the decoded rows and passes error rows through."""

    def __init__(self, settings: Settings, profile_doc: dict[str, Any], warmup: bool = True) -> None:
        import ray  # only ever constructed inside a Ray worker

        apply_thread_policy(settings)
        self.engine = engine_from_settings(settings)
        self.engine.load(warmup_batch=2 if warmup else 0)
        self.profile = Profile.from_dict(profile_doc)
        # the profile derives its own features from the walk; it must share the walk (served_key)
        if (self.profile.model_id, served_key(self.profile.options)) != (
            self.engine.info.model_id,
            served_key(self.engine.options),
        ):
            raise ProfileMismatch(
                f"this worker loaded {self.engine.info.model_id}; profile {self.profile.name!r} is for "
                f"{self.profile.model_id} or other method options (the workers' model folder differs?)"
            )
        self.node = ray.get_runtime_context().get_node_id()
        self.options = json.dumps(self.profile.options.to_dict(), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        images = torch.from_numpy(np.array(batch["image"][ok], dtype=np.float32))  # a writable copy
        digests = batch["digest"]
        prepared = [PreparedImage(images[j], (0, 0), bytes(digests[i])) for j, i in enumerate(ok)]
        verdicts: dict[int, Verdict] = dict(
            zip(ok, self.profile.verdicts(self.engine.image_stats(prepared)), strict=True)
        )
        return self.rows([str(p) for p in batch["path"]], verdicts, errors)

    def rows(self, paths: list[str], verdicts: dict[int, Verdict], errors: list[str]) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
        for i, path in enumerate(paths):
            v = verdicts.get(i)
            columns["path"].append(path)
            columns["score"].append(None if v is None else v.score)
            columns["threshold"].append(self.profile.threshold)
            columns["thresholds"].append(json.dumps(self.profile.thresholds, sort_keys=True))
            columns["is_anomaly"].append(None if v is None else v.is_anomaly)
            columns["p_value"].append(None if v is None else v.p_value)
            columns["percentile"].append(None if v is None else v.percentile)
            columns["model_id"].append(self.profile.model_id)
            columns["profile"].append(self.profile.name)
            columns["options"].append(self.options)
            columns["error"].append(errors[i] or None)
            columns["node"].append(self.node)
        return pa.table(columns, schema=SCHEMA)
