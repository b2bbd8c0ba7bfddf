#!/usr/bin/env python
"""Draw the dataset-cartography data map of a run as a PNG.

    python scripts/data_map.py <run dir> [--out map.png] [--max-points 100000] [--burn-out N]

<run dir> is a run trained with `trainer.record_dynamics=true` (it has training_dynamics/), its
training_dynamics/ folder, or a `method=ftft|cartography` run (the map of its reference run, found via
run_info.json `reference.path`). The map: variability (x) against confidence (y), one point per training
example, coloured by correctness (fraction of epochs predicted correctly), with the marginal histograms
of variability (top) and confidence (right), and the correctness counts (top right). Statistics as in
robustft/cartography.py (variability: std with ddof=0, as allenai/cartography). The scatter is
rasterised, so 100k points draw in seconds; above --max-points a seeded sample is drawn (the
histograms always use every example).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from robustft.cartography import DynamicsError, Stats, compute_stats, dynamics_folder, read_dynamics  # noqa: E402


def find_dynamics(path: Path) -> Path:
    """The training_dynamics folder for a run dir, a dynamics folder, or an ftft/cartography run."""
    folder = dynamics_folder(path)
    if any(folder.glob("dynamics_epoch_*.jsonl")):
        return folder
    info = path / "run_info.json"
    if info.is_file():
        ref = (json.loads(info.read_text()).get("reference") or {}).get("path")
        if ref and any(dynamics_folder(Path(ref)).glob("dynamics_epoch_*.jsonl")):
            return dynamics_folder(Path(ref))
    raise DynamicsError(f"no training dynamics under {path}: train with trainer.record_dynamics=true, "
                        "or pass an ftft/cartography run whose reference run still exists")


def plot_data_map(stats: Stats, out: Path, title: str = "", max_points: int = 100_000, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    epochs = stats.num_epochs
    idx = np.arange(len(stats))
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=max_points, replace=False))
    levels = epochs + 1
    cmap = ListedColormap(plt.get_cmap("coolwarm_r")(np.linspace(0, 1, levels)))
    norm = BoundaryNorm(np.arange(levels + 1) - 0.5, levels)

    fig = plt.figure(figsize=(9, 8))
    grid = fig.add_gridspec(2, 2, width_ratios=[4, 1.2], height_ratios=[1.2, 4], wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    corner = fig.add_subplot(grid[0, 1])

    size = 2 if len(idx) > 20_000 else 8
    points = ax.scatter(stats.variability[idx], stats.confidence[idx], c=stats.correctness[idx], cmap=cmap,
                        norm=norm, s=size, alpha=0.6, linewidths=0, rasterized=True)
    ax.set_xlabel("variability")
    ax.set_ylabel("confidence")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(left=0)
    box = {"boxstyle": "round,pad=0.3", "fc": "white", "alpha": 0.8}
    ax.annotate("ambiguous", xy=(0.88, 0.5), xycoords="axes fraction", ha="center", va="center", bbox=box)
    ax.annotate("easy-to-learn", xy=(0.2, 0.93), xycoords="axes fraction", ha="center", va="center", bbox=box)
    ax.annotate("hard-to-learn", xy=(0.2, 0.07), xycoords="axes fraction", ha="center", va="center", bbox=box)
    bar = fig.colorbar(points, ax=[ax, right], location="bottom", shrink=0.6, pad=0.13, aspect=40,
                       ticks=np.arange(levels))
    bar.set_ticklabels([f"{k / max(epochs, 1):.2g}" for k in range(levels)])
    bar.set_label(f"correctness (fraction of {epochs} epochs predicted correctly)")
    bar.solids.set_alpha(1)

    top.hist(stats.variability, bins=50, color="teal")
    top.set_ylabel("count")
    top.tick_params(labelbottom=False)
    right.hist(stats.confidence, bins=50, orientation="horizontal", color="#622a87")
    right.set_xlabel("count")
    right.tick_params(labelleft=False)
    counts = np.bincount(stats.correctness, minlength=levels)
    corner.bar(np.arange(levels), counts, color=cmap(np.arange(levels)))
    corner.set_xticks(np.arange(levels), [f"{k / max(epochs, 1):.2g}" for k in range(levels)], fontsize=7)
    corner.set_title("correctness", fontsize=9)
    corner.tick_params(labelsize=7)

    shown = "" if len(idx) == len(stats) else f", {len(idx):,} shown"
    fig.suptitle(f"{title + ': ' if title else ''}data map of {len(stats):,} examples, {epochs} epochs{shown}", y=0.93)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Dataset-cartography data map (PNG) of a run's training dynamics.")
    parser.add_argument("run", type=Path, help="run dir with training_dynamics/, that folder, or an ftft/cartography run")
    parser.add_argument("--out", type=Path, help="PNG path (default: <run>/data_map.png)")
    parser.add_argument("--max-points", type=int, default=100_000, help="scatter at most this many (seeded sample)")
    parser.add_argument("--burn-out", type=int, help="use only the first N epochs")
    parser.add_argument("--title", default="", help="title prefix, e.g. 'SST-2 minilm'")
    args = parser.parse_args(argv)
    try:
        folder = find_dynamics(args.run)
        t0 = time.perf_counter()
        stats = compute_stats(read_dynamics(folder, args.burn_out))
    except (DynamicsError, OSError) as e:
        print(f"data_map.py: error: {e}", file=sys.stderr)
        return 1
    out = args.out or (args.run if args.run.name != "training_dynamics" else args.run.parent) / "data_map.png"
    plot_data_map(stats, out, args.title, args.max_points)
    print(f"wrote {out} ({len(stats):,} examples, {stats.num_epochs} epochs, from {folder}; "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
