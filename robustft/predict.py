"""Inference: scoring a tokenized split (`evaluate`, the loop's evaluation) and batched scoring of raw text
(`Predictor`, the one entry point evaluators such as AdvGLUE, attacks and OOD sets call)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig

from robustft import distributed
from robustft.data import collate, eval_batches
from robustft.methods.base import Method, task_loss
from robustft.metrics import task_metrics
from robustft.runtime import autocast, to_device

if TYPE_CHECKING:
    from transformers import BatchEncoding

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 30.0  # a long split (MNLI's 9,815 dev pairs on a CPU) logs how far it is, also off a terminal


class Predictor:
    """Scores lists of raw text tuples with a trained model (eval mode, no grad, length-sorted batches).

    `queries` counts every example scored, so attacks can report and cap model queries.
    """

    def __init__(self, model, tokenizer, method: Method, device: torch.device, amp: torch.dtype | None,
                 max_length: int = 128, batch_size: int = 128) -> None:
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.device, self.amp, self.max_length, self.batch_size = device, amp, max_length, batch_size
        self.queries = 0

    @property
    def unk_token(self) -> str:
        """The tokenizer's unknown token; attacks put it in place of a word to measure its importance."""
        return getattr(self.tokenizer, "unk_token", None) or "[UNK]"

    def logits(self, texts: Sequence[tuple[str, ...]]) -> np.ndarray:
        """Raw model outputs, shape (n, num_labels); a regression model gives (n, 1)."""
        out = np.empty((len(texts), self.model.config.num_labels), dtype=np.float32)
        if not texts:
            return out
        enc, batches = self.encode(texts)
        for rows in batches:
            out[rows] = self.score(enc, rows)
        return out

    def encode(self, texts: Sequence[tuple[str, ...]]) -> tuple[BatchEncoding, list[np.ndarray]]:
        """Tokenize `texts` once (unpadded) and cut them into length-sorted batches of row indices."""
        enc = self.tokenizer(*zip(*texts), truncation=True, max_length=self.max_length)
        lengths = [len(x) for x in enc["input_ids"]]
        return enc, self._batches(np.argsort(lengths, kind="stable"), lengths)

    @torch.no_grad()
    def score(self, enc: BatchEncoding, rows: np.ndarray) -> np.ndarray:
        """Logits of one batch: rows `rows` of `enc`, padded together; shape (len(rows), num_labels)."""
        if self.model.training:  # eval() walks every module: too slow to repeat per attack call
            self.model.eval()
        self.queries += len(rows)
        feats = {k: [enc[k][i] for i in rows] for k in enc.keys()}
        batch = {k: v.to(self.device) for k, v in self.tokenizer.pad(feats, return_tensors="pt").items()}
        with autocast(self.device, self.amp):
            logits = self.method.predict(self.model, batch)
        return logits.float().cpu().numpy()

    def _batches(self, order: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
        """Cut the length-sorted order into batches of at most batch_size whose lengths stay close.

        An attack merges requests of many examples, so a batch can span short and long texts; on CPU the
        cost follows padded tokens, so a batch also ends where the length grows by more than ~25%.
        """
        batches, start = [], 0
        for k in range(1, len(order) + 1):
            if k == len(order) or k - start >= self.batch_size or \
                    lengths[order[k]] > 1.25 * lengths[order[start]] + 4:
                batches.append(order[start:k])
                start = k
        return batches

    def probs(self, texts: Sequence[tuple[str, ...]]) -> np.ndarray:
        logits = self.logits(texts)
        if logits.shape[1] == 1:
            return logits
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@torch.no_grad()
def evaluate(model, method: Method, ds: Dataset, tokenizer, task: DictConfig, batch_size: int,
             device: torch.device, amp: torch.dtype | None) -> tuple[dict[str, float], np.ndarray]:
    """Task metrics (+ loss, examples/s) on one split; returns the predictions in dataset order.

    In a data-parallel run every rank scores every world-th length-sorted batch (interleaved, so the long
    batches spread over the ranks), the batches are gathered on every rank, and rank 0 computes the metrics
    once and broadcasts them. Batches are the single process's, so predictions and the loss (summed in
    batch order) are the same numbers whatever the number of processes.
    """
    model.eval()
    batches = eval_batches(ds, batch_size)
    parts: list[tuple[int, list[int], np.ndarray, float]] = []
    t0 = last_log = time.perf_counter()
    done = 0
    for b in range(distributed.rank(), len(batches), distributed.world_size()):
        rows = batches[b]
        if time.perf_counter() - last_log > PROGRESS_EVERY_S and distributed.is_main():
            last_log = time.perf_counter()
            log.info("scored %d/%d examples (%.1f ex/s)", done * distributed.world_size(), len(ds),
                     done * distributed.world_size() / (last_log - t0))
        done += len(rows)
        batch = to_device(collate(ds, rows, tokenizer, task.is_regression), device)
        with autocast(device, amp):
            logits = method.predict(model, batch)
        logits = logits.float()
        loss = task_loss(logits, batch["labels"], task.is_regression).item() * len(rows)
        pred = (logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).cpu().numpy()
        parts.append((b, rows, pred, loss))
    parts = sorted(distributed.gather_in_order(parts), key=lambda part: part[0])
    elapsed = time.perf_counter() - t0
    pred = np.empty(len(ds), dtype=np.float64 if task.is_regression else np.int64)
    loss_sum = 0.0
    for _, rows, p, loss in parts:
        pred[rows] = p
        loss_sum += loss
    metrics = None
    if distributed.is_main():
        metrics = task_metrics(task, pred, np.asarray(ds["label"]))  # the metrics the task config names
        metrics["loss"] = loss_sum / len(ds)
        metrics["examples_per_s"] = len(ds) / elapsed if elapsed > 0 else float("nan")
    return distributed.broadcast_object(metrics), pred


def prediction_rows(ds: Dataset, pred: np.ndarray) -> list[dict[str, int | float]]:
    """predictions/<split>.jsonl rows: the dataset's `idx`, gold `label` and `pred` (class index, or the float
    of a regression) of each example, in dataset order: per-example records make paired tests over examples
    possible (robustft-report)."""
    return [{"idx": int(i), "label": label, "pred": p.item()} for i, label, p in zip(ds["idx"], ds["label"], pred)]
