#!/usr/bin/env python
"""A2T's adversarial-example generation (method=adv_train) against a TextAttack-style generation, same examples.

Both generate with the method's attack (conf/method/adv_train.yaml: gradient word importance, counter-fitted
swaps, A2T's constraints) on the same `--examples` SST-2 training sentences, the model in eval mode:

- robustft: `AdvTrain.generate` (examples attacked side by side, `concurrency`, their queries merged into
  length-sorted batches, each padded to its longest input);
- TextAttack-style: one example at a time (concurrency 1), every query batch (at most 32 texts, TextAttack's
  model_batch_size) padded to the model's max length, as TextAttack's HuggingFaceModelWrapper does. The
  gradient ranking pass is the same batched pass in both (TextAttack runs it per example).

The attacks are the same searches, so both produce the same adversarial texts (checked and printed); the ratio
of the wall times is printed, with the load average. Keep sizes tiny on a shared machine:

    python scripts/bench_adv_gen.py --examples 8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _bench_env import REPO, quiet  # noqa: E402  (offline flags + repo on sys.path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--query-budget", type=int, default=0, help="queries per example (0 = the YAML's: unlimited)")
    p.add_argument("--pad-to", type=int, default=0, help="TextAttack-style padding length (0 = the model's max)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-dir", default=os.environ.get("ROBUSTFT_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    args = p.parse_args(argv)
    quiet()
    import numpy as np
    import torch

    from robustft.cli import compose_config
    from robustft.data import load_task
    from robustft.methods.adv_train import BatchScorer
    from robustft.methods.base import TrainContext, instantiate_method
    from robustft.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    over = [f"model={args.model}", "task=sst2", "method=adv_train", f"data_dir={Path(args.data_dir).resolve()}",
            "method.share=1.0", f"seed={args.seed}"]
    if args.query_budget:
        over.append(f"method.attack.goal.query_budget={args.query_budget}")
    cfg = compose_config(over)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.task)
    pad_to = args.pad_to or min(int(tok.model_max_length), int(model.config.max_position_embeddings))
    train = load_task(cfg.task, cfg.data_dir, args.seed)["train"]
    rows = np.random.default_rng(args.seed).choice(len(train), args.examples, replace=False).tolist()
    raw = train.select(rows)

    class MaxLengthScorer(BatchScorer):
        """TextAttack-style scoring: every batch padded to the model's max length."""

        def probs(self, texts):
            enc = self.tokenizer(*zip(*texts), truncation=True, max_length=pad_to, padding="max_length",
                                 return_tensors="pt")
            out = []
            with torch.no_grad():
                for start in range(0, len(texts), self.batch_size):
                    batch = {k: v[start : start + self.batch_size] for k, v in enc.items()}
                    self.modes.add(self.model.training)
                    self.queries += len(batch["input_ids"])
                    self.tokens += int(batch["input_ids"].numel())
                    out.append(torch.softmax(self.model(**batch).logits.float(), -1).numpy())
            return np.concatenate(out)

    def run(textattack_style: bool) -> tuple[float, list, int]:
        method = instantiate_method(cfg.method, "method")
        ctx = TrainContext(task=cfg.task, trainer=cfg.trainer, device=torch.device("cpu"), seed=args.seed,
                           tokenizer=tok, data_dir=Path(cfg.data_dir))
        method.setup(model, ctx)
        method.train_data(raw, ctx)
        if textattack_style:
            method.concurrency = 1
            method.make_scorer = lambda m, ml: MaxLengthScorer(m, tok, ml, torch.device("cpu"), 32)
        t0 = time.perf_counter()
        pool = method.generate(model, raw["idx"])
        return time.perf_counter() - t0, pool, method.cost["queries"]

    load0 = os.getloadavg()[0]
    fast_s, fast_pool, fast_q = run(False)
    slow_s, slow_pool, slow_q = run(True)
    load1 = os.getloadavg()[0]
    same = [p["fields"] for p in fast_pool] == [p["fields"] for p in slow_pool]
    print(f"model={args.model} examples={args.examples} threads={args.threads} pad_to={pad_to} "
          f"load average {load0:.2f} -> {load1:.2f} on {os.cpu_count()} cores")
    print(f"robustft (batched, dynamic padding): {fast_s:.2f} s, {fast_q} queries, {len(fast_pool)} adversarial")
    print(f"TextAttack-style (one at a time, padded to {pad_to}): {slow_s:.2f} s, {slow_q} queries, "
          f"{len(slow_pool)} adversarial; same adversarial texts: {same}")
    print(f"ratio TextAttack-style / robustft: {slow_s / fast_s:.1f}x")


if __name__ == "__main__":
    main()
