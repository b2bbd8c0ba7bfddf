"""The data-parallel training step: one method step inside DistributedDataParallel, and each rank's rows.

DDP only synchronises gradients of a forward that ran through its wrapper. Methods call submodules
directly (Match-Tuning `model.base_model`, the perturbation methods `get_input_embeddings()` and
`model(inputs_embeds=...)`, FreeLB/SMART `torch.autograd.grad` inside the step), so the loop wraps
`TrainStep`, whose forward is the whole `method.training_step`: every pass of a step happens inside DDP's
forward and the methods stay unchanged. `torch.autograd.grad` inside the step does not accumulate into
`.grad`, so it fires no DDP hook; the loop's one `backward` of the returned loss does.

Single-process runs never build any of this (`wrap` is only called with world size > 1).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robustft import distributed
from robustft.methods.base import Method, StepOutput


class TrainStep(nn.Module):
    """`method.training_step(model, batch)` as a module forward (the method itself is not a module)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.method.training_step(self.model, batch)


def wrap(model: nn.Module, method: Method, device: torch.device) -> DistributedDataParallel:
    """DDP around `TrainStep(model, method)`, built after the method's setup and its model stages (DDP
    registers the parameters that require grad at construction; stage 1 of weight mixup changes them).

    - no buffer broadcast per forward (broadcast_buffers=False): the models' buffers (position ids, token type ids) are constants, so the
      per-forward broadcast would be pure overhead; the weights start equal (same seed, and DDP broadcasts
      rank 0's parameters and buffers once here).
    - find_unused_parameters=True: which parameters a step reaches is the method's business (Match-Tuning
      never reaches BERT's pooler, LoRA's frozen base needs no gradient, a method may skip the word
      embeddings in a pass). DDP then walks the autograd graph from the step's outputs once per forward
      (small next to the forward itself) and leaves the gradient of a parameter no rank used at None, as a
      single-process backward does, so AdamW skips it there too. static_graph would save the walk but
      assumes every step reaches the same parameters, which the loop cannot promise for every method.
    """
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # torch >= 2.12 renamed the per-forward buffer broadcast (the old name still works, with a warning)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else {"broadcast_buffers": False})
    return DistributedDataParallel(TrainStep(model, method), device_ids=ids, find_unused_parameters=True,
                                   **no_buffer_sync)


def local_rows(rows: list[int]) -> tuple[list[int], float]:
    """This rank's contiguous share of a global micro-batch and its fraction of the batch's rows.

    The loop scales the rank's mean loss by fraction x world size: DDP averages gradients over ranks, so
    the result is the gradient of the global batch's mean loss also when the shares differ by one row (an
    uneven last batch). A rank left without rows (fewer rows than ranks) still has to join the backward
    (DDP's all-reduce waits for every rank): it runs one row of the batch with fraction 0.
    """
    start, stop = distributed.shard_bounds(len(rows))
    if stop > start:
        return rows[start:stop], (stop - start) / len(rows)
    return rows[:1], 0.0
