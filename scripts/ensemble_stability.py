#!/usr/bin/env python
"""How much a trained run's predicted labels depend on the batch a text is scored in.

SAFER, RanMASK and DNE predict with `ensemble_size` random copies of each input, drawn from one generator
seeded at every predict call (robustft/methods/ensemble.py, dne.py): a text's copies, and so possibly its
label, change with the other texts in its batch, as they change at every call in the official code. An
attack meets such a change as a label flip it did not cause. For each run directory, this scores the
original sentences of the run's TextFooler sample `--repeats` times, each time in batches of `--batch-size`
drawn by a seeded shuffle, and prints the share of sentences whose label is not the same in every repeat
and the accuracy of each repeat. A deterministic predictor (vanilla) gives 0 (a check of the script).

    python scripts/ensemble_stability.py RUN_DIR [RUN_DIR ...] --repeats 5 --threads 1

A run directory needs its checkpoint (checkpoints/best or last) and eval/textfooler/samples.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from _bench_env import REPO, quiet  # noqa: E402  (offline flags + repo on sys.path)


def load_run(run: Path, data_dir: str):
    """(predictor, texts, labels) of a trained run: its resolved config, checkpoint and attack sample."""
    import torch
    from omegaconf import OmegaConf

    from robustft.methods.base import TrainContext, instantiate_method
    from robustft.models import load_model, load_tokenizer
    from robustft.predict import Predictor
    from robustft.runner import resolve_ckpt_path

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    ckpt = resolve_ckpt_path(str(run))
    sample = run / "eval" / "textfooler" / "samples.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines() if line.strip()]
    fields, names = list(cfg.task.text_fields), list(cfg.task.label_names)
    texts = [tuple(r["original"][f] for f in fields) for r in rows]
    labels = [names.index(r["label"]) for r in rows]
    tokenizer = load_tokenizer(cfg.model, ckpt)
    model = load_model(cfg.model, cfg.task, ckpt_path=ckpt)
    method = instantiate_method(cfg.method, "method")
    ctx = TrainContext(task=cfg.task, trainer=cfg.trainer, device=torch.device("cpu"), seed=int(cfg.seed),
                       tokenizer=tokenizer, data_dir=Path(data_dir))
    model = method.setup(model, ctx).eval()
    return Predictor(model, tokenizer, method, torch.device("cpu"), None, int(cfg.trainer.max_length)), texts, labels


def label_runs(predictor, texts, repeats: int, batch_size: int):
    """(repeats, n) predicted labels, repeat r scoring the texts in batches of a default_rng(r) shuffle."""
    import numpy as np

    enc, _ = predictor.encode(texts)  # its length-sorted batches are not used: the batches here are shuffled
    out = np.empty((repeats, len(texts)), dtype=np.int64)
    for r in range(repeats):
        order = np.random.default_rng(r).permutation(len(texts))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[r, rows] = predictor.score(enc, rows).argmax(-1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=os.environ.get("ROBUSTFT_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    args = p.parse_args(argv)
    for run in args.runs:
        missing = [f for f in (".hydra/config.yaml", "eval/textfooler/samples.jsonl") if not (run / f).is_file()]
        if missing or args.repeats < 2 or args.batch_size < 1:
            why = f"{run} has no {missing[0]}" if missing else "--repeats must be >= 2 and --batch-size >= 1"
            print(f"robustft: error: {why}; pass a trained run directory with a TextFooler sample", file=sys.stderr)
            return 2
    quiet()
    import numpy as np
    import torch

    from robustft.errors import UserError

    torch.set_num_threads(args.threads)
    print("run | ensemble size | sentences | label not the same in every repeat | accuracy per repeat")
    for run in args.runs:
        try:
            predictor, texts, labels = load_run(run, args.data_dir)
        except UserError as e:
            print(f"robustft: error: {e}", file=sys.stderr)
            return 2
        preds = label_runs(predictor, texts, args.repeats, args.batch_size)
        unstable = float(np.mean((preds != preds[0]).any(axis=0)))
        accs = " ".join(f"{a:.3f}" for a in (preds == np.asarray(labels)).mean(axis=1))
        size = getattr(predictor.method, "ensemble_size", 1)
        print(f"{run} | {size} | {len(texts)} | {unstable:.3f} | {accs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
