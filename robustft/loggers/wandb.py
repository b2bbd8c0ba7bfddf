"""`logger=wandb`: one Weights & Biases run per robustft run, `mode=offline` by default (files in
`<run dir>/wandb/`; `wandb sync <run dir>/wandb/offline-run-*` uploads them later).

`wandb.init` gets the YAML's options as given (project, entity, group, tags, notes, mode, job_type); `group`
null = the configuration without its seed, so W&B's grouping averages a sweep's seeds. Config: the flattened
resolved config plus run_dir and git sha; history: every metrics.jsonl row against the metric `global_step`
(a method's own stage rows, e.g. weight mixup's stage 1, keep their own step count without breaking W&B's
monotonic step); summary: metrics.json's values and `status`. Every run is finished explicitly with its status
(exit code 0 = completed), so neither a sweep nor a data-parallel job ends up as one W&B run. A resumed run
continues the W&B run whose id trackers.json holds (`resume="allow"`). Console capture is off: the progress bar
and log stay robustft's.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

from robustft.loggers.base import RunMeta, Tracker

ID_CHARS = string.ascii_lowercase + string.digits


class WandbTracker(Tracker):
    module = "wandb"

    def __init__(self, project: str, entity: str | None, group: str | None, tags: list[str] | None,
                 notes: str | None, mode: str, job_type: str | None, log_checkpoint: bool) -> None:
        self.options = {"project": project, "entity": entity, "group": group, "notes": notes, "mode": mode,
                        "job_type": job_type}
        self.tags, self.log_checkpoint = [str(t) for t in tags or []], bool(log_checkpoint)
        self.run: Any = None
        self.run_dir = Path()

    def open(self, meta: RunMeta, folder: Path, state: dict[str, Any] | None) -> dict[str, Any]:
        import wandb

        # `dir` is the run directory: wandb puts its files in <dir>/wandb/, the folder RunDir hands over
        folder.mkdir(parents=True, exist_ok=True)
        self.run_dir = meta.run_dir
        run_id = (state or {}).get("id") or "".join(secrets.choice(ID_CHARS) for _ in range(8))  # W&B's id form
        options = {**self.options, "group": self.options["group"] or meta.group}
        self.run = wandb.init(**options, dir=str(folder.parent), id=run_id, resume="allow", name=meta.name,
                              tags=[*self.tags, f"seed={meta.seed}"], config=meta.params, reinit="create_new",
                              settings=wandb.Settings(console="off", quiet=True, silent=True))
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        return {"id": run_id, "project": options["project"], "group": options["group"]}

    def log_rows(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            self.run.log({"global_step": step, **values})

    def log_final(self, metrics: dict[str, float]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in metrics.items()})

    def close(self, status: str, tags: dict[str, str]) -> None:
        import wandb

        self.run.config.update({"run_dir": tags.get("run_dir"), "git_sha": tags.get("git_sha")}, allow_val_change=True)
        self.run.summary["status"] = status
        self.run.tags = (*self.run.tags, f"status={status}")
        best = self.run_dir / "checkpoints" / "best"
        if self.log_checkpoint and status == "completed" and best.is_dir():
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model")
            artifact.add_dir(str(best))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status == "completed" else 1)
