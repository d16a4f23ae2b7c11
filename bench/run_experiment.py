"""Run a timed Tiny Shakespeare experiment for several seeds and record wall time and val loss.

    python bench/run_experiment.py --seeds 1 2 3 --out bench/runs/shakespeare_cpu
    python bench/run_experiment.py --experiment shakespeare_gpu --seeds 1 2 3 --out bench/runs/shakespeare_gpu

Each seed is one `python -m fluxtrain experiment=NAME ...` process, timed from before it starts to after it exits
(imports, data, compilation, training, final eval and saving included). The load average of the machine before and
after each run is recorded next to the figures, in `<out>/results.json`; runs go one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def experiment_command(experiment: str, data_path: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    """`python -m fluxtrain experiment=NAME` for one seed, into `run_dir`, with `extra` overrides last."""
    return [
        sys.executable, "-m", "fluxtrain", f"experiment={experiment}", f"data.path={data_path}",
        f"train.seed={seed}", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def run_seed(experiment: str, seed: int, out: Path, data_path: str, extra: list[str]) -> dict:
    run_dir = out / f"seed{seed}"
    cmd = experiment_command(experiment, data_path, seed, run_dir, extra)
    load_before = os.getloadavg()
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - start
    load_after = os.getloadavg()
    (out / f"seed{seed}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"seed {seed} failed (exit {proc.returncode}); see {out / f'seed{seed}.log'}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "seed": seed,
        "process_start_unix": start,
        "process_wall_sec": wall,
        "final_val_loss": metrics["final_val_loss"],
        "iters": metrics["iters"],
        "tokens_per_sec": metrics["tokens_per_sec"],
        "load_before": load_before,
        "load_after": load_after,
        "run_dir": run_dir.name,  # relative to the results file
        "command": " ".join(cmd[1:]),
    }


def device_name() -> str:
    """The GPU the runs had, or the CPU's model name."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="shakespeare_cpu", help="a config in conf/experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, help="where the runs and results.json go (bench/runs/EXPERIMENT)")
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--append", action="store_true", help="add to the runs already in <out>/results.json")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    args.out = args.out or REPO / "bench" / "runs" / args.experiment
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text())["runs"] if args.append and results_file.exists() else []
    for seed in args.seeds:
        r = run_seed(args.experiment, seed, args.out.resolve(), args.data, args.overrides)
        results.append(r)
        print(
            f"seed {seed}: val loss {r['final_val_loss']:.4f} | {r['process_wall_sec']:.1f}s wall | "
            f"{r['iters']} iters | {r['tokens_per_sec']:,.0f} tok/s | load {r['load_before'][0]:.2f} -> "
            f"{r['load_after'][0]:.2f}",
            flush=True,
        )
    losses = [r["final_val_loss"] for r in results]
    walls = [r["process_wall_sec"] for r in results]
    summary = {
        "val_loss_mean": statistics.mean(losses),
        "val_loss_min": min(losses),
        "val_loss_max": max(losses),
        "wall_sec_mean": statistics.mean(walls),
        "wall_sec_max": max(walls),
        "device": device_name(),
    }
    if len(results) > 1:
        summary["val_loss_stdev"] = statistics.stdev(losses)
    results_file.write_text(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")
    print(
        f"val loss {summary['val_loss_mean']:.4f} (min {summary['val_loss_min']:.4f}, "
        f"max {summary['val_loss_max']:.4f}) | wall {summary['wall_sec_mean']:.1f}s mean, "
        f"{summary['wall_sec_max']:.1f}s max"
    )


if __name__ == "__main__":
    main()
