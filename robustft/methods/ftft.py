"""Dataset cartography (Swayamdipta et al., 2020) and FTFT (Du, Gatt & Nguyen, COLING 2025).

Both are `DataMapMethod`: a *reference* model is fine-tuned (ERM) on the whole training set while its
per-epoch training logits are recorded (`trainer.record_dynamics`); the data-map statistics of those
dynamics (robustft/cartography.py) select a subset (default: the 33% most ambiguous examples), and the
main model is fine-tuned on that subset only.

- `method=cartography`: the reference is the main model itself (`reference.model: null`), the main
  model trains on the subset with the usual schedule.
- `method=ftft`: the reference is a cheaper model (default: minilm truncated to 2 layers; any model
  config, e.g. `glove_bow`, or a hub model online), and the main model uses aggressive early stopping:
  evaluation every 50 steps with patience 2 (as the paper), keeping the best checkpoint. conf/method/ftft.yaml
  sets these as `trainer.eval_every` / `trainer.early_stopping_patience`, so explicit trainer overrides win.

The reference run is a *stage* (robustft/stages.py): the method declares it (`stages()`), the runner runs
it and hands back its folder. It is cached under `reference.cache_dir/<key>`, a normal run directory
(run_info.json, metrics.json, training_dynamics/, stage.json with the key's inputs), linked from the main
run as `stages/reference`. The key hashes the composed reference config (model, trainer minus
logging/saving knobs, task, stress), the seed and the content of the training split. A completed cached
run is reused (logged, `reference/reused=1`, its path in run_info.json `stages.reference.path`);
otherwise it is trained and the global RNG state is restored afterwards, so the main run is the same
whether the reference was cached or not. `selection: random` needs no reference. Costs (the runner's):
`cost/reference_*` (the reference run's training cost, also when reused), `cost/main_*` (this run's
loop) and `cost/total_*` = reference + main.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf

from robustft.cartography import RULES, STATS_FILE, compute_stats, read_dynamics, select
from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext
from robustft.stages import RunStage, StageResult

log = logging.getLogger("robustft")


class DataMapMethod(Method):
    """Fine-tune on the subset of the training data selected by a reference model's data map."""

    def __init__(self, *, name: str, selection: str, fraction: float, variability_ddof: int, burn_out: int | None,
                 reference: DictConfig | dict[str, Any]) -> None:
        super().__init__(name)
        if selection not in RULES:
            raise UserError(f"method.selection={selection} is unknown; choose one of {', '.join(RULES)}")
        if not 0 < float(fraction) <= 1:
            raise UserError(f"method.fraction={fraction} must be in (0, 1], e.g. 0.33")
        # reference is a free-form node in the YAML: its keys are checked here (model_overrides stays free)
        takes = {"model", "model_overrides", "trainer", "seed", "reuse", "cache_dir"}
        if set(reference) != takes:
            wrong = sorted(set(reference) ^ takes)
            raise UserError(f"method.reference: {'unknown' if wrong[0] in reference else 'missing'} option "
                            f"'method.reference.{wrong[0]}'; it takes {', '.join(sorted(takes))}")
        self.selection, self.fraction = selection, float(fraction)
        self.ddof, self.burn_out = int(variability_ddof), burn_out
        self.reference = OmegaConf.create(reference)
        self.ref_result: StageResult | None = None
        self._files: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self.n_selected = self.n_total = 0

    # --- the reference run (a stage the runner runs) -----------------------------------------------
    def stages(self) -> list[RunStage]:
        if self.selection == "random":  # no data map needed
            return []
        ref = self.reference
        cache = Path(str(ref.get("cache_dir") or "~/.cache/robustft/references")).expanduser()
        trainer = {**OmegaConf.to_container(ref.get("trainer") or OmegaConf.create({})), "record_dynamics": True}
        model = ref.get("model")
        return [RunStage(name="reference", model=model if isinstance(model, str | None) else OmegaConf.to_container(model),
                         model_overrides=OmegaConf.to_container(ref.get("model_overrides") or OmegaConf.create({})),
                         trainer=trainer, seed=ref.get("seed"), product="training_dynamics",
                         cache_dir=str(cache), reuse=bool(ref.get("reuse", True)))]

    def stage_done(self, result: StageResult) -> None:
        self.ref_result = result

    # --- data ------------------------------------------------------------------------------------
    def train_data(self, train: Dataset, ctx: TrainContext) -> Dataset:
        if ctx.task.is_regression:
            raise UserError(f"method={self.name} needs a classification task (data maps use gold-label "
                            f"probabilities); {ctx.task.name} is regression")
        guids = np.asarray(list(train["idx"]), dtype=np.int64)
        info: dict[str, Any] = {"rule": self.selection, "fraction": self.fraction, "variability_ddof": self.ddof,
                                "burn_out": self.burn_out}
        reference = None
        if self.selection == "random":
            chosen = select(None, "random", self.fraction, seed=ctx.seed, guids=guids)
        else:
            res = self.ref_result
            if res is None:
                raise UserError(f"method={self.name} needs its reference stage; run it through robustft.runner.fit")
            dyn = read_dynamics(res.path, self.burn_out)
            if not np.array_equal(dyn.guid, np.sort(guids)):
                raise UserError(f"the reference dynamics in {res.path} cover other examples than this run's training "
                                "split; delete that folder to retrain the reference")
            stats = compute_stats(dyn, ddof=self.ddof)
            self._files[STATS_FILE] = list(stats.rows())
            chosen = select(stats, self.selection, self.fraction)
            reference = {"path": str(res.path), "key": res.key, "reused": res.reused, "epochs": dyn.num_epochs,
                         "model": str(res.config.model.name) if res.config is not None else None}
        keep = set(chosen.tolist())
        rows = [i for i, g in enumerate(guids.tolist()) if g in keep]
        self.n_selected, self.n_total = len(rows), len(guids)
        info.update(n_selected=self.n_selected, n_total=self.n_total)
        log.info("%s: kept %d of %d training examples (%s, fraction %.2f)", self.name, self.n_selected,
                 self.n_total, self.selection, self.fraction)
        self._files["selection.json"] = {**info, "reference": reference, "guids": chosen.tolist()}
        self._info = {"reference": reference, "selection": info}
        return train.select(rows)

    def files(self) -> dict[str, Any]:
        return self._files

    def run_info(self) -> dict[str, Any]:
        return self._info

    # --- final metrics -----------------------------------------------------------------------------
    def metrics(self, train_metrics: dict[str, float]) -> dict[str, float]:
        return {"selection/n_selected": float(self.n_selected), "selection/n_total": float(self.n_total)}
