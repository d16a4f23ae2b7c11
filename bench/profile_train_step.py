"""Where a training step's time goes: torch.profiler over fluxtrain training steps of the reference shape.

python bench/profile_train_step.py                       # reference shape, default blocks, AdamW
python bench/profile_train_step.py model.activation=relu2 optim.name=muon --steps 30
python bench/profile_train_step.py precision=bf16 model.bias=false  # the forward under CPU bf16 autocast
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxtrain.model import GPT, ModelConfig  # noqa: E402
from fluxtrain.optim import OptimConfig, build_optimizer  # noqa: E402
from fluxtrain.precision import autocast_context  # noqa: E402

VOCAB = 65


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="model.* / optim.* / batch_size=N / precision=P settings")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    cfg = OmegaConf.merge(
        {
            "model": dict(d_model=128, n_heads=4, n_layers=4, ff_dim=512, seq_len=64, dropout=0.0),
            "optim": dict(name="adamw", lr=1e-3, betas=[0.9, 0.99], weight_decay=0.1),
            "batch_size": 12,
            "precision": "fp32",
        },
        OmegaConf.from_dotlist(args.overrides),
    )
    model_cfg = ModelConfig(**OmegaConf.to_container(cfg.model))
    model = GPT(model_cfg, VOCAB)
    optimizer = build_optimizer(model, OptimConfig(**OmegaConf.to_container(cfg.optim)))
    data = torch.randint(VOCAB, (100_000,))
    generator = torch.Generator().manual_seed(0)
    T = model_cfg.seq_len

    def step() -> None:
        with record_function("batch"):
            starts = torch.randint(len(data) - T, (cfg.batch_size,), generator=generator)
            window = data[starts[:, None] + torch.arange(T + 1)]
        with record_function("forward"), autocast_context(torch.device("cpu"), cfg.precision):
            _, loss = model(window[:, :-1], window[:, 1:])
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
