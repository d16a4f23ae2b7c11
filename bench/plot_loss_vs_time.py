r"""Plot loss against wall-clock seconds from process start, from the runs' TensorBoard events.

    python bench/plot_loss_vs_time.py bench/runs/shakespeare_cpu/results.json --out bench/shakespeare_cpu_loss.png
    python bench/plot_loss_vs_time.py bench/shakespeare_gpu_results.json --out bench/shakespeare_gpu_loss.png \
        --reference 180 1.4697 --budget 90 --target 1.47 --ylim 0.9 2.5 \
        --title "Tiny Shakespeare, one H100: experiment=shakespeare_gpu"

The x axis is seconds since each process started (`process_start_unix` in the results file written by
bench/run_experiment.py), so the time spent on imports, data and compilation shows as an offset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--reference",
        type=float,
        nargs=2,
        default=(150.0, 1.886),
        metavar=("SECONDS", "LOSS"),
        help="the reference recipe's result (default: the CPU recipe, 1.886 after about 150 s)",
    )
    parser.add_argument("--budget", type=float, default=150.0, help="the wall-time budget in seconds")
    parser.add_argument("--target", type=float, default=1.70, help="the val loss target")
    parser.add_argument("--title", default="Tiny Shakespeare, 2-core CPU: experiment=shakespeare_cpu")
    parser.add_argument("--ylim", type=float, nargs=2, default=(1.3, 3.0))
    args = parser.parse_args()
    runs = json.loads(args.results.read_text())["runs"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        events = EventAccumulator(str(args.results.parent / run["run_dir"]))  # relative paths resolve there
        events.Reload()
        t0 = run["process_start_unix"]
        color = f"C{i}"
        train = events.Scalars("train/loss")
        ax.plot([e.wall_time - t0 for e in train], [e.value for e in train], color=color, alpha=0.5, lw=1)
        val = events.Scalars("val/loss")
        label = f"seed {run['seed']}: val {run['final_val_loss']:.3f} at {run['process_wall_sec']:.0f}s (process end)"
        ax.plot([e.wall_time - t0 for e in val], [e.value for e in val], "o-", color=color, label=label)
    seconds, loss = args.reference
    ax.plot(seconds, loss, "k*", markersize=12, label=f"reference recipe: {loss} at ~{seconds:.0f} s")
    ax.axvline(args.budget, color="gray", ls="--", lw=1)
    ax.axhline(args.target, color="gray", ls=":", lw=1)
    ax.set_xlabel("seconds since process start")
    ax.set_ylabel("loss (nats/char); lines: train, dots: val")
    ax.set_ylim(*args.ylim)
    ax.set_title(args.title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
