"""A tiny end-to-end training run: loss falls and the run folder holds what it should."""

import json

from fluxtrain.train import train


def test_tiny_run_learns_and_writes_run_folder(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg("train.max_iters=60", "train.eval_interval=30"), tmp_path / "run")
    run = tmp_path / "run"
    # A uniform guess over the ~30-symbol vocabulary costs ln(30) = 3.4 nats; 60 steps must get well below.
    assert metrics["final_val_loss"] < 2.6
    for name in ("model_final.safetensors", "best.safetensors", "tokenizer.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text())["iters"] == 60
    assert list(run.glob("events.out.tfevents.*"))
