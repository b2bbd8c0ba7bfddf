"""Match-Tuning (Tong et al., IJCAI 2022, arXiv 2205.00633; official snippet: tongshoujie/MATCH-TUNING).

For a training batch, each instance's first-token vector h_i of the last layer is projected,
z_i = W h_i + b, the matching matrix M = row-softmax(Z Z^T / temperature) is formed over the whole batch
(diagonal included) and the classifier sees z~_i = sum_j M_ij z_j; the loss is the usual cross-entropy
against y_i. Labels never enter M. Early in training other-label rows of M act as perturbation, later
the weight moves to same-label instances (interpolation); the logged statistics show that shift.

Projection (`projection: head`, as the YAML sets it): the hidden x hidden dense layer that the model's own
sequence-classification head already applies to the first-token vector, i.e. BERT's `pooler.dense`
(pretrained, as in BERT fine-tuning, used by minilm and bert), RoBERTa's `classifier.dense` and
DeBERTa-v2's `pooler.dense`. Matching sits between that dense layer and the head's activation, exactly
where the official snippet puts it (`ori_rep = self.dense(outputs[0][:, 0])`, match, then the rest of
the head). Reasons: it is the layer the snippet names (a hid-to-hid `self.dense` applied to the [CLS]
vector of `outputs[0]`), it adds no parameters (checkpoints stay plain HF models that load anywhere),
and with one instance per batch M = [[1]], so the method reduces exactly to vanilla fine-tuning.
`projection=none` is an ablation without projection (Z = the raw first-token vectors, then the full head).

Departures (see also the comments in the code):
- Dropout: the head's own dropout before the dense layer (RoBERTa, DeBERTa-v2) is kept, so the path
  equals the HF forward; the snippet shows no dropout before `self.dense`, and what follows
  `match_rep` (activation, dropout, classifier) is not shown there: we use the model's own head.
- Evaluation: matching is off (`eval_matching: false` in the YAML), so a prediction does not depend on the
  rest of the batch; the official code (only a snippet is public) does not say what it does at test time.
- `temperature`: the snippet divides by an unspecified `temp`; 1.0 would be the plain softmax, which
  measured near-uniform matching on minilm: conf/method/match_tuning.yaml sets 0.1 (numbers there).
- Data parallel (robustft/distributed.py): each rank matches within its own shard of the global batch
  (trainer.batch_size / world size instances), as the official code matches within each GPU's batch; no
  matching across ranks, so M and the result depend on the number of ranks (a batch of B in one process
  is not world batches of B / world). The match/* statistics logged are rank 0's shard's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from robustft.errors import UserError
from robustft.methods.base import Method, TrainContext, model_inputs
from robustft.methods.stats import LogWindow


@dataclass
class MatchHead:
    """The model's sequence-classification head split around its hidden x hidden dense layer."""

    pre: Callable[[torch.Tensor], torch.Tensor]  # first-token vector -> projection input (head dropout)
    dense: nn.Linear  # the projection W, b
    post: Callable[[torch.Tensor], torch.Tensor]  # matched representation -> logits (activation, dropout, classifier)


def match_head(model: nn.Module) -> MatchHead:
    """Split the head of a BERT-family, RoBERTa or DeBERTa-v2 sequence classifier (HF submodules, reused)."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    classifier = getattr(model, "classifier", None)
    if mtype in ("roberta", "xlm-roberta", "camembert") and hasattr(classifier, "out_proj"):
        # RobertaClassificationHead: dropout -> dense -> tanh -> dropout -> out_proj
        head = classifier
        return MatchHead(head.dropout, head.dense, lambda z: head.out_proj(head.dropout(torch.tanh(z))))
    if mtype in ("deberta-v2", "deberta") and hasattr(getattr(model, "pooler", None), "dense"):
        # ContextPooler: dropout -> dense -> pooler_hidden_act; then the model's dropout and classifier
        pooler, act = model.pooler, ACT2FN[model.pooler.config.pooler_hidden_act]
        return MatchHead(pooler.dropout, pooler.dense, lambda z: model.classifier(model.dropout(act(z))))
    pooler = getattr(getattr(model, "base_model", None), "pooler", None)
    if mtype == "bert" and pooler is not None and isinstance(classifier, nn.Linear):
        # BertPooler: dense -> tanh; then the model's dropout and classifier
        return MatchHead(nn.Identity(), pooler.dense, lambda z: model.classifier(model.dropout(pooler.activation(z))))
    raise UserError(
        f"method=match_tuning supports BERT-family (minilm, bert), RoBERTa and DeBERTa-v2 sequence classifiers, "
        f"not model_type={mtype!r} ({type(model).__name__})"
    )


def matching(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, M Z) with M = row-softmax(Z Z^T / temperature); the softmax is taken in fp32."""
    scores = (z @ z.transpose(-1, -2)).float() / temperature
    m = torch.softmax(scores, dim=-1)
    return m, m.to(z.dtype) @ z


def matching_stats(m: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Per-batch sums: [diag, rows, same-label weight, same pairs, other-label weight, other pairs].

    Off-diagonal entries only for the label statistics. With `labels=None` (regression) the label
    entries are zero.
    """
    m = m.detach().float()
    n = m.shape[0]
    diag = m.diagonal().sum()
    rows = torch.tensor(float(n), device=m.device)
    if labels is None:
        zero = torch.zeros((), device=m.device)
        return torch.stack([diag, rows, zero, zero, zero, zero])
    eye = torch.eye(n, dtype=torch.bool, device=m.device)
    same = (labels[:, None] == labels[None, :]) & ~eye
    other = labels[:, None] != labels[None, :]
    return torch.stack([diag, rows, (m * same).sum(), same.sum().float(), (m * other).sum(), other.sum().float()])


class MatchTuning(Method):
    """Match-Tuning: in-batch matching of projected [CLS] vectors before the classifier (training only)."""

    def __init__(self, *, name: str, temperature: float, eval_matching: bool, projection: str) -> None:
        super().__init__(name)
        if float(temperature) <= 0:
            raise UserError(f"method.temperature={temperature} must be > 0")
        if projection not in ("head", "none"):
            raise UserError(f"method.projection={projection!r}: choose head (the head's dense layer) or none")
        self.temperature = float(temperature)
        self.eval_matching = bool(eval_matching)
        self.projection = projection
        self.head: MatchHead | None = None
        self.window = LogWindow(1)

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().setup(model, ctx)
        self.head = match_head(model)
        self.window = LogWindow(int(ctx.trainer.log_every))
        return model

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not model.training and not self.eval_matching:
            return model(**model_inputs(batch)).logits  # evaluation: each instance on its own (vanilla path)
        head = self.head
        # BERT's backbone also computes its pooler output, unused here (one B x H x H matmul, negligible).
        h = model.base_model(**model_inputs(batch)).last_hidden_state[:, 0]
        if self.projection == "head":
            m, matched = matching(head.dense(head.pre(h)), self.temperature)
            logits = head.post(matched)
        else:  # ablation: match the raw first-token vectors, then the whole head
            m, matched = matching(head.pre(h), self.temperature)
            logits = head.post(head.dense(matched))
        if model.training:
            labels = None if self.ctx.task.is_regression else batch["labels"]
            self.window.add(matching_stats(m, labels))
        return logits

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(model, batch)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        logs = super().optimizer_step(optimizer, model)
        return {**logs, **self.step_logs()}

    def step_logs(self) -> dict[str, float]:
        """Matching statistics, averaged over the training batches since the last train row.

        match/diag: mean M_ii; match/same_label, match/other_label: mean off-diagonal entry M_ij over
        pairs with y_i = y_j and y_i != y_j (pair-weighted over the window); match/same_label_mass and
        match/other_label_mass: mean total weight a row puts on other same-label / other-label
        instances (diag + the two masses = 1). Uniform matching gives entries of 1/batch size.
        """
        sums = self.window.flush()
        if sums is None:
            return {}
        diag, rows, same, n_same, other, n_other = sums
        logs = {"match/diag": diag / rows}
        if not self.ctx.task.is_regression:
            logs["match/same_label_mass"] = same / rows
            logs["match/other_label_mass"] = other / rows
            if n_same:
                logs["match/same_label"] = same / n_same
            if n_other:
                logs["match/other_label"] = other / n_other
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "window" in state:
            self.window.load_state_dict(state["window"], self.ctx.device if self.ctx else None)
