"""Compare overrides of an experiment at a fixed iteration count, two runs side by side with one thread each.

    python bench/compare_settings.py "" "optim.schedule=linear optim.min_lr=0" --iters 2300 --seeds 1 2

A time-budgeted run's loss follows the machine's speed while it ran, which drifts on a shared machine by more than
most settings change it. Here every variant trains for the same number of iterations (the LR schedule laid over
them, `train.max_time=null`), so its val loss depends only on the setting and the seed; the training time of
runs that share the machine, two at a time, says what the setting costs. Each variant is one quoted string of
overrides; "" is the experiment as it stands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from run_experiment import REPO, experiment_command  # bench/, next to this script


def start(experiment: str, data: str, iters: int, seed: int, overrides: str, run_dir: Path) -> subprocess.Popen:
    fixed = ["train.max_time=null", f"train.max_iters={iters}", "train.threads=1"]
    cmd = experiment_command(experiment, data, seed, run_dir, [*fixed, *shlex.split(overrides)])
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='quoted override lists; "" is the experiment unchanged')
    parser.add_argument("--experiment", default="shakespeare_cpu")
    parser.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--iters", type=int, default=2300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--out", type=Path, help="where the runs go (a temporary folder if not given)")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="compare_settings_"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, v) for seed in args.seeds for i, v in enumerate(args.variants)]
    rows = []
    for pair in (jobs[k : k + 2] for k in range(0, len(jobs), 2)):
        started = []
        for seed, i, overrides in pair:
            run_dir = out / f"variant{i}_seed{seed}"
            proc = start(args.experiment, str(Path(args.data).resolve()), args.iters, seed, overrides, run_dir)
            started.append((seed, overrides, run_dir, proc))
        for seed, overrides, run_dir, proc in started:
            if proc.wait() != 0:
                for *_, other in started:
                    other.kill()  # not left training on a core after this script has gone
                sys.exit(f"{overrides or '(unchanged)'} seed {seed} failed; see {run_dir}.log")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            wall = metrics["wall_time_sec"]  # the trainer's own: from the start of train() to the saved model
            time = f"{wall:.1f} s" + (" (alone)" if len(pair) == 1 else "")  # an odd job out had the machine to itself
            rows.append((overrides or "(unchanged)", seed, metrics["final_val_loss"], time))
            print(f"{rows[-1][0]} | seed {seed} | val loss {rows[-1][2]:.4f} | {time}", flush=True)
    print(f"\n{args.iters} iterations each, runs in {out}\n")
    print("| overrides | seed | val loss | training time (2 runs at once) |\n|---|--:|--:|--:|")
    for overrides, seed, loss, time in rows:
        print(f"| `{overrides}` | {seed} | {loss:.4f} | {time} |")


if __name__ == "__main__":
    main()
