"""The entrypoints' --config (docs/architecture.md), as the controller writes it: the policy's relevant spec
sections in camelCase, plus runId, kind, storeSchema, activeRelease and the data window [start, end), and the
policy's identity (policy, namespace, policyUid): the schema's owner a job checks before it writes.

Parsed here with plain defaults (workloads never import the operator's models; the two share only this
contract). Unknown keys are ignored so an older workload image accepts a newer controller's config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recupdate_workloads.contract.durations import parse_seconds
from recupdate_workloads.contract.timefmt import epoch_seconds
from recupdate_workloads.data.sources import DataConfig

if TYPE_CHECKING:
    from recupdate_workloads.store.owner import Owner


@dataclass
class RunConfig:
    run_id: str
    kind: str
    store_schema: str
    window_start: int
    window_end: int
    active_release: str | None = None
    base_model: str = ""
    lora: dict[str, Any] = field(default_factory=dict)
    positive_threshold: float = 3.5
    retrieval_window: int = 30 * 86_400
    top_successors: int = 5
    scoring: str = "frequency"
    min_support: int = 5
    neighbours: int = 5
    blend: float = 0.0
    gates: dict[str, Any] = field(default_factory=dict)
    epochs: float = 1
    learning_rate: float = 2e-3
    batch_size: int = 64
    max_per_pair: int | None = 200
    with_evidence: bool = True
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    holdout_fraction: float = 0.1
    executor: str = "ray"
    storage: str = ".recupdate/artifacts"
    model_size: str = "small"
    policy: str = ""
    namespace: str = ""
    policy_uid: str = ""
    #: spec.data: the sources the run's sync step reads (store/sync.py)
    data: DataConfig = field(default_factory=DataConfig)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text_or_path: str, run_id: str | None = None) -> RunConfig:
        p = Path(text_or_path)
        text = p.read_text() if not text_or_path.lstrip().startswith("{") and p.exists() else text_or_path
        c = json.loads(text)
        model, data, retr = c.get("model") or {}, c.get("data") or {}, c.get("retrieval") or {}
        ft = c.get("fineTune") or {}
        hp, res = ft.get("hyperparameters") or {}, ft.get("resources") or {}
        lora = model.get("lora") or {}
        window = c.get("window") or {}
        rid = run_id or c.get("runId")
        if not rid:
            raise ValueError("the config needs runId (or pass --run-id)")
        if "start" not in window or "end" not in window:
            raise ValueError("the config needs window {start, end}")
        return cls(
            run_id=rid,
            kind=c.get("kind", "refresh"),
            store_schema=c.get("storeSchema") or "recupdate",
            window_start=epoch_seconds(window["start"]),
            window_end=epoch_seconds(window["end"]),
            active_release=c.get("activeRelease"),
            base_model=model.get("base") or "",
            lora={
                "r": lora.get("r", 8),
                "alpha": lora.get("alpha", 16),
                "dropout": lora.get("dropout", 0.0),
                **({"target_modules": lora["targetModules"]} if lora.get("targetModules") else {}),
            },
            positive_threshold=float(data.get("positiveThreshold", 3.5)),
            retrieval_window=parse_seconds(retr.get("window", "30d")),
            top_successors=int(retr.get("topSuccessors", 5)),
            scoring=retr.get("scoring", "frequency"),
            min_support=int(retr.get("minSupport", 5)),
            neighbours=int(retr.get("neighbours", 5)),
            blend=_blend(retr.get("blend", 0.0)),
            gates=c.get("gates") or {},
            epochs=float(hp.get("epochs", 1)),
            learning_rate=float(hp.get("learningRate", 2e-3)),
            batch_size=int(hp.get("batchSize", 64)),
            max_per_pair=hp.get("maxPerPair", 200),
            with_evidence=bool(hp.get("withEvidence", True)),
            workers=int(res.get("workers", 1)),
            cpus_per_worker=float(res.get("cpusPerWorker", 1.0)),
            gpus_per_worker=float(res.get("gpusPerWorker", 0.0)),
            executor=c.get("executor") or os.environ.get("RECUPDATE_EXECUTOR", "ray"),
            storage=c.get("storage") or os.environ.get("RECUPDATE_STORAGE", ".recupdate/artifacts"),
            model_size=c.get("modelSize") or os.environ.get("RECUPDATE_MODEL_SIZE", "small"),
            policy=str(c.get("policy") or ""),
            namespace=str(c.get("namespace") or ""),
            policy_uid=str(c.get("policyUid") or ""),
            data=DataConfig.parse(data),
            raw=c,
        )

    @property
    def owner(self) -> Owner | None:
        """The policy the run is for, as the schema's owner must be; None when the config does not say (a
        hand-written config): then no ownership check."""
        from recupdate_workloads.store.owner import Owner  # the store package imports psycopg

        if not self.policy:
            return None
        return Owner(self.namespace or "default", self.policy, self.policy_uid)

    @property
    def holdout_start(self) -> int:
        """The most recent slice of the window is held out for the gates."""
        return self.window_end - int((self.window_end - self.window_start) * self.holdout_fraction)


def _blend(value: Any) -> float:
    b = float(value)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"retrieval.blend must be in [0, 1], not {value!r}")
    return b
