"""Attention-guided weight mixup with bi-level optimisation (Somayajula et al., NAACL 2024, arXiv 2403.12918;
official code Sai-Ashish/Attention_guided_weight_mixup_BLO, run on the Betty library 0.2.0).

Every mixed linear layer computes y = x (alpha * W)^T + b + x (alpha_bar * W0)^T with W0 the frozen
pretrained weight, W the task weight (starts at W0) and a rank-1 attention alpha = a1 a2^T kept in [0, 1];
alpha_bar = (1 - a1)(1 - a2)^T (official `blo.py`, `complement=code`) or 1 - alpha (the paper,
`complement=paper`). Which layers are mixed, the layer's autograd and its checkpoint format: `mixed`.

Data: `train_size` N subsamples the training set (stratified for classification, seeded exactly like
`stress=low_resource` with n=N, so both pick the same examples); stage 1 and stage 2 both use these N.

Stage 1 (bi-level, `bilevel.BiLevelStage`, declared as the `ModelStage` "bilevel": the loop runs it before its first step): over
`folds` random 80/20 splits of the N examples, W on D_tr (inner level) and alpha on D_val (outer level),
one inner step per outer step, with Betty's DARTS-style finite-difference hypergradient (`hypergrad`);
then W and alpha are set to their fold averages.

Stage 2 is the runner's loop: W (all parameters but a1, a2, W0) fine-tuned on the N examples with alpha and
W0 frozen, with the trainer's batch size, epochs, warmup and clipping (official: batch 16, 3 epochs, warmup
10%, wd 0.01, lr 2e-5, clip 1.0 - the settings of its vanilla baseline).

Modules: `mixed` (MixedLinear, wrap_model), `bilevel` (stage 1: folds, batches, inner/outer steps),
`hypergrad` (Adam preconditioning, the finite difference), `dropout` (SameDropout), `disk` (DiskCopy),
`method` (the WeightMixup Method). Options and their defaults: robustft/conf/method/weight_mixup.yaml.

Departures from the official code (each also commented where it happens):
- One inner step and one outer step per iteration, W restored exactly after the finite difference. Betty
  0.2.0 (the version the official environment pins) with `roll_back=True` caches states by reference (no
  copy), so its roll-back restores nothing and each iteration runs inner, outer, inner (same batch) and
  outer steps again; its finite difference "restores" W with an out-of-place `add`, leaving W at W - eps v.
  Both were fixed in later Betty (commit 7573af4, "fix bugs in darts and rollback").
- The two finite-difference passes use the same dropout masks (recorded in the first pass and replayed,
  `SameDropout`, or drawn again from the restored RNG state); in the official code they draw independent
  masks, whose difference, divided by 2 eps, swamps the derivative.
- Batches: the inner level walks through D_tr in seeded per-epoch permutations, the outer level through
  D_val likewise; steps per fold = ceil(epochs * ceil(|D_tr| / batch)) (official: epochs * (|D_tr| // batch + 1)).
  With `stage1.group_by_length` (default) each epoch's batches are length-grouped (official: random batches).
- The N-example subsample is stratified (official: uniform `random.sample`), and train_size larger than
  the training set is an error (official: silently all of it); the fold splits are uniform
  as in the official code. The official extra "dev" split (N/6 more training examples for monitoring
  stage 1) is not drawn: stage 1 is monitored by its losses in metrics.jsonl (split `stage1`).
- torch.optim.AdamW (decay before the update) for both levels; the official inner optimizer is HF's
  `AdamW` of transformers 4.24 (decay after the update). The official L1 penalty on alpha (off in its
  scripts) is not offered.
- Fresh alpha per fold is drawn from a generator seeded by (seed, fold), not from the global RNG; after
  `setup` (and without stage 1) a1 = a2 = 1, so the wrapped model computes exactly the loaded model.
"""

from robustft.methods.weight_mixup.bilevel import BiLevelStage
from robustft.methods.weight_mixup.disk import DiskCopy
from robustft.methods.weight_mixup.dropout import SameDropout
from robustft.methods.weight_mixup.method import WeightMixup
from robustft.methods.weight_mixup.mixed import MixedLinear, Scratch, mixed_linear_names, wrap_model

__all__ = ["BiLevelStage", "DiskCopy", "MixedLinear", "SameDropout", "Scratch", "WeightMixup", "mixed_linear_names",
           "wrap_model"]
