"""InfoBERT (Wang et al., ICLR 2021, "InfoBERT: Improving Robustness of Language Models from an Information
Theoretic Perspective"; official code AI-secure/InfoBERT ANLI/local_robust_trainer.py `_adv_training_step`,
ANLI/MI_estimators.py `CLUBv2`, `InfoNCE`, run with `--version 6`; the same in RockyLzy/TextDefender
trainer/infobert.py).

FreeLB's K ascent steps on a word-embedding perturbation delta (robustft/methods/freelb.py: start, normalised
step, projection, gradients accumulated over the steps), each step's loss extended by two regularisers on
the forward at e + delta (h_0 = the embedding layer's output, `hidden_states[0]`; z = the last layer's [CLS]):

    step loss = [ CE + beta * IB_upper(h_0 of the real tokens) ] / K  -  alpha * mean_chunks InfoNCE(h_0[i, s], z_i) / K

- Information bottleneck (CLUBv2 with version 3): IB_upper = mean_n sum_d (y_n - y_{r(n)})^2 / 2 over the
  real tokens' y = h_0 rows, r(n) drawn uniformly with replacement.
- Anchored features: per example, its real tokens sorted by the norm of grad_delta (CE + beta IB) / K at that
  step; the tokens of ranks ceil(n cl) .. ceil(n ch) - 1 (the "local robust features") are paired with the
  example's z. The pairs are shuffled with a fixed permutation (sklearn's `shuffle(random_state=seed)`),
  cut in chunks of trainer.batch_size, and each chunk gives the InfoNCE lower bound
  mean_i T(x_i, y_i) - mean_i logsumexp_j T(x_j, y_i) + log n, T a critic MLP (2h -> 300 -> 1, ReLU,
  Softplus) trained with the model (in the optimizer's weight-decay group, as the official).
The ascent uses the gradient of the first part only (the official clones delta.grad before the lower bound's
backward). All forwards of a step share their dropout masks (the official `clear_mask` around the loop).

Departures: the random indices r(n) come from a generator seeded by (run seed, micro-batch count, rank)
(`club_generator`), not the global CPU stream, so a resume, on every rank, draws what the uninterrupted run
draws; the critic starts from torch's initialisation under the run seed. The loss handed to the loop is the
official total (task + upper - alpha lower), so `train/loss` is not the plain cross-entropy. Choosing the features needs the ranks on the host: one device sync per ascent step (the
official's Python loop has several). Data parallel: the critic's gradients are averaged over the ranks
before its update (the critic is not part of the DDP-wrapped model).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.utils import shuffle
from torch import nn

from robustft import distributed
from robustft.checkpoint import set_torch_rng_state, torch_rng_state
from robustft.errors import UserError
from robustft.methods.base import StepOutput, TrainContext, adamw, decay_groups, model_inputs, task_loss
from robustft.methods.freelb import EXAMPLE, _WithGrads, ascent_update, init_delta, set_ascent_options
from robustft.methods.perturb import PerturbationMethod, check_nonnegative, norm, word_embeddings

CRITIC_WIDTH = 300  # the official InfoNCE's `self.lower_size` (fixed there, not an option)


class InfoNCE(nn.Module):
    """The official lower-bound critic T(x, y) = Softplus(W2 ReLU(W1 [x; y])) and its InfoNCE bound."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.F_func = nn.Sequential(nn.Linear(2 * hidden, CRITIC_WIDTH), nn.ReLU(), nn.Linear(CRITIC_WIDTH, 1),
                                    nn.Softplus())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = y.shape[0]
        t0 = self.F_func(torch.cat([x, y], dim=-1))
        t1 = self.F_func(torch.cat([x.unsqueeze(0).expand(n, -1, -1), y.unsqueeze(1).expand(-1, n, -1)], dim=-1))
        return t0.mean() - (t1.logsumexp(dim=1).mean() - math.log(n))


def club_upper(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """CLUBv2.mi_est_sample: mean over rows of sum_d (y - y[index])^2 / 2."""
    return ((y - y[index]) ** 2 / 2.0).sum(-1).mean()


def robust_features(grad: torch.Tensor, mask: torch.Tensor, cl: float, ch: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(example, position) of each example's real tokens whose gradient-norm rank is in [ceil(n cl), ceil(n ch)),
    example by example, each in ascending order of the norm (the official `feature_ranking`)."""
    norms = grad.float().norm(dim=-1).masked_fill(mask == 0, float("inf"))  # padding sorts last
    order = norms.argsort(dim=1, stable=True)
    n = mask.sum(dim=1, keepdim=True).double()
    rank = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    keep = (rank >= torch.ceil(n * cl)) & (rank < torch.ceil(n * ch))
    example, r = keep.nonzero(as_tuple=True)
    return example, order[example, r]


def club_generator(seed: int, call: int, rank: int) -> torch.Generator:
    """The CPU generator of the CLUB sample indices of micro-batch `call` on `rank`."""
    state = np.random.SeedSequence([int(seed), int(call), int(rank)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)  # manual_seed takes a signed 64-bit value


class InfoBERT(PerturbationMethod):
    """FreeLB-style adversarial training with InfoBERT's information-bottleneck and anchored-feature terms."""

    log_names = ("infobert/upper_bound", "infobert/lower_bound", "infobert/delta_norm")

    def __init__(self, name: str, adv_steps: int, adv_lr: float, adv_init_mag: float, adv_max_norm: float,
                 norm_type: str, alpha: float, beta: float, cl: float, ch: float) -> None:
        super().__init__(name)
        set_ascent_options(self, adv_steps, adv_lr, adv_init_mag, adv_max_norm, norm_type,
                           "1 with adv_init_mag=0: no adversary")
        check_nonnegative(alpha=alpha, beta=beta)
        if not 0.0 <= float(cl) <= float(ch) <= 1.0:
            raise UserError(f"method.cl={cl}, method.ch={ch}: need 0 <= cl <= ch <= 1 (official 0.5, 0.9)")
        self.alpha, self.beta, self.cl, self.ch = float(alpha), float(beta), float(cl), float(ch)
        self.critic: InfoNCE | None = None
        self.gen: torch.Generator | None = None  # the CLUB sample indices of the current micro-batch
        self.calls = 0  # micro-batches trained so far (resume state): seeds `gen`
        self.chunk = 0  # pairs per InfoNCE chunk: trainer.batch_size (set up with the run)
        self.params: list[nn.Parameter] | None = None
        self.delta: torch.Tensor | None = None

    def setup(self, model: nn.Module, ctx: TrainContext) -> nn.Module:
        model = super().setup(model, ctx)
        with torch.random.fork_rng(devices=[]):  # the critic's initialisation leaves the run's CPU stream alone
            torch.manual_seed(int(ctx.seed))
            self.critic = InfoNCE(model.get_input_embeddings().embedding_dim).to(ctx.device)
        self.chunk = int(ctx.trainer.batch_size)  # the official cuts the pairs by the train batch size
        return model

    def configure_optimizer(self, model: nn.Module, trainer) -> torch.optim.Optimizer:
        groups = decay_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], trainer.weight_decay)
        groups[0]["params"] += list(self.critic.parameters())  # official: the critic in the weight-decay group
        return adamw(groups, float(trainer.lr), next(model.parameters()).device)

    def flops_factor(self) -> float:
        """Per step: forward (1/3), the input gradient for the ascent and the feature ranks (1/3), the full
        backward of task + both bounds (2/3): 4/3 per step; the critic (2h x 300 per pair) is not counted."""
        return 4 * self.adv_steps / 3

    def lower_bound(self, h0: torch.Tensor, z: torch.Tensor, example: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Mean InfoNCE bound over the chunks of the shuffled (local feature, [CLS]) pairs."""
        m = int(example.shape[0])  # a host sync: the pairs' count decides the permutation and the chunks
        if m == 0:
            return h0.new_zeros(())
        idx = torch.from_numpy(shuffle(np.arange(m), random_state=int(self.ctx.seed))).to(h0.device)  # official
        local, anchor = h0[example[idx], pos[idx]], z[example[idx]]
        bounds = [self.critic(local[i:i + self.chunk], anchor[i:i + self.chunk]) for i in range(0, m, self.chunk)]
        return torch.stack(bounds).mean()

    def step_losses(self, model: nn.Module, batch: dict[str, torch.Tensor], delta: torch.Tensor):
        """The step loss [CE + beta IB_upper] / K - alpha InfoNCE / K at e + delta, its logits, the ascent
        gradient (of the bracket only) and the two weighted terms (detached, for the logs)."""
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        mask = batch["attention_mask"]
        out = model(inputs_embeds=word_embeddings(model, batch) + delta, output_hidden_states=True, **inputs)
        h0, z = out.hidden_states[0], out.hidden_states[-1][:, 0]
        tokens = h0[mask.bool()]  # the real tokens, example by example (right padding)
        index = torch.randint(tokens.shape[0], (tokens.shape[0],), generator=self.gen).to(tokens.device)
        upper = self.beta * club_upper(tokens.float(), index) / self.adv_steps
        first = task_loss(out.logits, batch["labels"], self.ctx.task.is_regression) / self.adv_steps + upper
        (grad,) = torch.autograd.grad(first, delta, retain_graph=True)
        example, pos = robust_features(grad, mask, self.cl, self.ch)
        lower = self.alpha * self.lower_bound(h0.float(), z.float(), example, pos) / self.adv_steps
        return first - lower, out.logits, grad, upper.detach(), lower.detach()

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        if self.params is None:
            self.params = [p for p in model.parameters() if p.requires_grad] + list(self.critic.parameters())
        self.gen = club_generator(self.ctx.seed, self.calls, distributed.rank())
        self.calls += 1
        with torch.no_grad():
            embeds = word_embeddings(model, batch)
        delta = init_delta(embeds, batch["attention_mask"], self.adv_init_mag, self.norm_type)
        rng = torch_rng_state(embeds.device)
        used, buffer, earlier, logs, logits0 = [], None, [], [], None
        for t in range(self.adv_steps):
            if t:
                set_torch_rng_state(rng, embeds.device)  # the first step's dropout masks (official clear_mask)
            delta.requires_grad_()
            loss, logits, grad, upper, lower = self.step_losses(model, batch, delta)
            logits0 = logits.detach() if logits0 is None else logits0
            logs.append(torch.stack([upper, lower]))
            if t == self.adv_steps - 1:
                break
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            if buffer is None:
                used = [p for p, g in zip(self.params, grads) if g is not None]
                buffer = [g for g in grads if g is not None]
            else:
                torch._foreach_add_(buffer, [g for g in grads if g is not None])
            earlier.append(loss.detach())
            delta = ascent_update(delta.detach(), grad, self.adv_lr, self.adv_max_norm, self.norm_type)
        self.delta = delta.detach()
        sums = torch.stack(logs).sum(0)
        self.record(sums[0], sums[1], norm(self.delta, "l2", EXAMPLE).mean())
        if buffer is not None:
            loss = _WithGrads.apply(loss + torch.stack(earlier).sum(), buffer, *used)
        return StepOutput(loss, logits0)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, float]:
        if distributed.world_size() > 1:  # DDP averages the model's gradients, not the critic's
            params = list(self.critic.parameters())
            for p in params:  # a rank without pairs has no critic gradient: every rank sends the same tensors
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = distributed.all_reduce_sum(torch.cat([g.flatten() for g in grads])) / distributed.world_size()
            torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
        optimizer.step()
        return self.step_logs()

    def state_dict(self) -> dict[str, Any]:
        critic = {f"critic.{k}": v for k, v in self.critic.state_dict().items()}
        return {**super().state_dict(), **critic, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        critic = {k.removeprefix("critic."): v for k, v in state.items() if k.startswith("critic.")}
        if critic:
            self.critic.load_state_dict(critic)  # in place: the optimizer keeps its references
        self.calls = int(state.get("calls", 0))
