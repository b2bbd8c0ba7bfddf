"""`logger=mlflow`: one MLflow run per robustft run, through `MlflowClient` (no global active run, so the jobs of
an in-process sweep never share one).

Store: `tracking_uri` as given (`http://host:5000`, `sqlite:///...`, `databricks`); null = a local SQLite store
`mlflow.db` (artifacts in `mlartifacts/`) at the sweep directory in a sweep, so its jobs land in one store and
`mlflow ui --backend-store-uri sqlite:///multirun/<time>/mlflow.db` compares them, else in the run directory.
Experiment: `experiment_name`, null = the recipe (`experiment=...`) or "robustft". The seeds of one configuration
share the tag `group` (group by it in the UI) and carry `seed`. Params: the flattened config; metrics: every
metrics.jsonl row at its step, then metrics.json's values under `final/`; tags: status, git sha, run dir, task,
method, model. A resumed run reopens the run whose id trackers.json holds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from robustft.loggers.base import RunMeta, Tracker

MAX_VALUE = 6000  # MLflow's limit on a param value's length (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MLflowTracker(Tracker):
    module = "mlflow"

    def __init__(self, tracking_uri: str | None, experiment_name: str | None, run_name: str | None,
                 tags: dict[str, Any] | None, log_checkpoint: bool) -> None:
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.tags, self.log_checkpoint = dict(tags or {}), bool(log_checkpoint)
        self.client: Any = None
        self.run_id = ""
        self.run_dir = Path()

    def open(self, meta: RunMeta, folder: Path, state: dict[str, Any] | None) -> dict[str, Any]:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = self.tracking_uri or f"sqlite:///{meta.store / 'mlflow.db'}"
        artifacts = None if self.tracking_uri else (meta.store / "mlartifacts").as_uri()
        self.client, self.run_dir = MlflowClient(tracking_uri=uri), meta.run_dir
        if state and state.get("run_id") and state.get("tracking_uri") == uri:  # a resumed run: the same run
            self.run_id = str(state["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
            return dict(state)
        experiment = self._experiment(self.experiment_name or meta.experiment, artifacts)
        tags = {**meta.tags, **{str(k): str(v) for k, v in self.tags.items()}, "status": "running"}
        run = self.client.create_run(experiment, tags=tags, run_name=self.run_name or meta.name)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:MAX_VALUE]) for k, v in meta.params.items()]
        for chunk in _chunks(params, 100):  # MLflow takes at most 100 params per request
            self.client.log_batch(self.run_id, params=chunk)
        return {"run_id": self.run_id, "tracking_uri": uri, "experiment_id": experiment}

    def _experiment(self, name: str, artifacts: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # another job of the sweep created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _metrics(self, points: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in points]
        for chunk in _chunks(metrics, 1000):  # MLflow takes at most 1000 metrics per request
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        self._metrics([(key, value, step) for step, values in rows for key, value in values.items()])

    def log_final(self, metrics: dict[str, float]) -> None:
        self._metrics([(f"final/{key}", value, 0) for key, value in metrics.items()])

    def close(self, status: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        best = self.run_dir / "checkpoints" / "best"
        if self.log_checkpoint and status == "completed" and best.is_dir():
            self.client.log_artifacts(self.run_id, str(best), "checkpoint")
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))
