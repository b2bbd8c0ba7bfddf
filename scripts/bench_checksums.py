#!/usr/bin/env python
"""What the sha256 record of a checkpoint costs: hashing a checkpoint folder against writing it, in one run.

Builds the model (default: the real embedded ``minilm``) with an AdamW state after one step, then, over
``--repeats`` interleaved rounds, times (a) ``save_checkpoint`` of checkpoints/last with the checksums
switched off (the write alone), (b) ``write_checksums`` of the written folder (the record: robustft hashes
after writing, from the page cache) and (c) ``verify_checksums`` (what a resume or ``ckpt_path`` adds).
Printed: the folder size, the median times, and (b)/(a) and (c)/(a) as medians of per-round ratios.

    python scripts/bench_checksums.py                  # ~1 min on 2 cores
    python scripts/bench_checksums.py --model tiny_random --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _bench_env import quiet  # noqa: E402  (offline flags + repo on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quiet()
    import torch

    import robustft.checkpoint as ckpt
    from robustft.config import compose_config
    from robustft.models import load_model, load_tokenizer

    cfg = compose_config([f"model={args.model}", "task=sst2"])
    model, tokenizer = load_model(cfg.model, cfg.task), load_tokenizer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model(input_ids=torch.ones(2, 8, dtype=torch.long), labels=torch.zeros(2, dtype=torch.long)).loss.backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": ckpt.rng_state()}
    real_write = ckpt.write_checksums
    write_s, hash_s, verify_s = [], [], []
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "last"
        for _ in range(args.repeats):
            ckpt.write_checksums = lambda folder: None
            t0 = time.perf_counter()
            ckpt.save_checkpoint(path, model, tokenizer, state)
            write_s.append(time.perf_counter() - t0)
            ckpt.write_checksums = real_write
            t0 = time.perf_counter()
            ckpt.write_checksums(path)
            hash_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ckpt.verify_checksums(path)
            verify_s.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
    print(f"model {args.model}: checkpoints/last holds {size / 2**20:.1f} MiB; load average {os.getloadavg()[0]:.1f}")
    print(f"save_checkpoint without checksums: median {statistics.median(write_s):.3f} s")
    print(f"write_checksums (sha256 of every file): median {statistics.median(hash_s):.3f} s, "
          f"{statistics.median(h / w for h, w in zip(hash_s, write_s)):.2f}x the write")
    print(f"verify_checksums (on load): median {statistics.median(verify_s):.3f} s, "
          f"{statistics.median(v / w for v, w in zip(verify_s, write_s)):.2f}x the write")


if __name__ == "__main__":
    main()
