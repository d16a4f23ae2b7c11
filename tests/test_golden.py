"""Golden losses: seeded 30-iteration CPU runs of a tiny model must reproduce the stored per-iteration losses.

An unintended change to the model, the data order, the optimizer or the schedule shows up here at once. When a
change is intended, regenerate the stored list and commit it with the change:

    PYTHONPATH=$PWD python -m tests.test_golden --regenerate
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fluxtrain.train import train

from .conftest import compose_config, make_text

GOLDEN_FILE = Path(__file__).with_name("golden_losses.json")
TOLERANCE = 1e-4

# Spelled out here (not shared with other tests) so that only a change to fluxtrain itself moves the numbers.
BASE = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.ff_dim=64",
    "model.seq_len=16",
    "train.max_iters=30",
    "train.batch_size=8",
    "train.log_interval=1",
    "train.eval_interval=30",
    "train.eval_iters=4",
    "train.sample_interval=0",
    "train.ckpt_interval=0",
    "train.device=cpu",
    "train.seed=1234",
    "optim.warmup_iters=5",
    "optim.lr=3e-3",
]
RUNS = {
    "default": [],
    "modern_adamw": [
        "model.norm=rmsnorm",
        "model.pos_emb=rope",
        "model.activation=swiglu",
        "model.bias=false",
        "optim.name=adamw",
        "optim.weight_decay=0.1",
        "optim.min_lr=3e-4",
    ],
    "muon": ["model.activation=relu2", "model.pos_emb=rope", "optim.name=muon", "optim.muon_lr=0.02"],
}


def golden_run(name: str, workdir: Path) -> dict[str, list[float]]:
    """Per-iteration training losses and the final val loss of the seeded run `name`."""
    text_file = workdir / "corpus.txt"
    text_file.write_text(make_text(20_000, seed=0), encoding="utf-8")
    cfg = compose_config([*BASE, *RUNS[name], f"data.path={text_file}", f"data.cache_dir={workdir / 'cache'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the summation order, hence the last bits, depends on the thread count
    try:
        metrics = train(cfg, workdir / name)
    finally:
        torch.set_num_threads(threads)
    events = EventAccumulator(str(workdir / name))
    events.Reload()
    train_losses = [e.value for e in events.Scalars("train/loss")]
    return {"train_loss": train_losses, "val_loss": [metrics["final_val_loss"]]}


@pytest.fixture(scope="module")
def golden() -> dict:
    if not GOLDEN_FILE.is_file():
        pytest.fail(f"{GOLDEN_FILE} is missing; create it with: python -m tests.test_golden --regenerate")
    return json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_losses_match_the_stored_list(name, golden, tmp_path):
    got = golden_run(name, tmp_path)
    want = golden[name]
    assert len(got["train_loss"]) == len(want["train_loss"]) == 30
    for key in ("train_loss", "val_loss"):
        for i, (g, w) in enumerate(zip(got[key], want[key], strict=True)):
            assert abs(g - w) <= TOLERANCE, (
                f"{name} {key}[{i}] = {g:.6f}, stored {w:.6f}; if the change is intended, "
                "regenerate with: python -m tests.test_golden --regenerate"
            )


def test_runs_differ_from_each_other(golden):
    # Guards the guard: the variant runs must actually exercise different code.
    finals = {name: golden[name]["train_loss"][-1] for name in RUNS}
    assert len({round(v, 4) for v in finals.values()}) == len(RUNS), finals


def regenerate() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(RUNS):
            out[name] = golden_run(name, Path(tmp))
            final = out[name]["train_loss"][-1], out[name]["val_loss"][0]
            print(f"{name}: final train loss {final[0]:.6f}, val loss {final[1]:.6f}")
    GOLDEN_FILE.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m tests.test_golden --regenerate")
    regenerate()
