"""Optimizer choice: Muon for hidden matrices with AdamW for the rest, one LR schedule, state round trip, fused Adam."""

import copy

import pytest
import torch

from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import read_model_file
from fluxtrain.optim import MultiOptimizer, OptimConfig, build_optimizer, set_lr
from fluxtrain.train import train


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=16), vocab_size=13)


def train_steps(model: GPT, optimizer, n: int, seed: int = 0) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        idx = torch.randint(13, (4, 16), generator=generator)
        _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02))
    assert isinstance(opt, MultiOptimizer)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    name_of = {id(p): n for n, p in model.named_parameters()}
    muon_names = {name_of[id(p)] for g in muon.param_groups for p in g["params"]}
    adamw_names = {name_of[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert muon_names == {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    }
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "blocks.0.attn.qkv.bias"} <= adamw_names
    assert muon_names.isdisjoint(adamw_names) and muon_names | adamw_names == set(name_of.values())


def test_one_schedule_drives_both_learning_rates():
    opt = build_optimizer(tiny_model(), OptimConfig(name="muon", lr=1e-3, muon_lr=0.02))
    set_lr(opt, 5e-4)  # half of optim.lr: Muon goes to half of muon_lr
    adamw, muon = opt.optimizers
    assert all(g["lr"] == pytest.approx(5e-4) for g in adamw.param_groups)
    assert all(g["lr"] == pytest.approx(0.01) for g in muon.param_groups)


def test_muon_state_round_trip_continues_identically():
    cfg = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02)
    model = tiny_model()
    opt = build_optimizer(model, cfg)
    train_steps(model, opt, 3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    want = train_steps(model, opt, 3, seed=1)

    resumed = tiny_model()
    resumed.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed, cfg)
    resumed_opt.load_state_dict(saved_opt)
    assert train_steps(resumed, resumed_opt, 3, seed=1) == want


@pytest.mark.parametrize("name", ["adam", "adamw", "muon"])
def test_each_optimizer_lowers_the_loss(name):
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=3e-3, muon_lr=0.02))
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(13, (8, 16), generator=generator)  # one fixed batch: memorizing it must be fast
    losses = []
    for _ in range(30):
        _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, (name, losses[0], losses[-1])


def test_adam_is_fused_on_cpu():
    for name in ("adam", "adamw"):
        opt = build_optimizer(tiny_model(), OptimConfig(name=name))
        assert opt.defaults["fused"] is True


@pytest.mark.parametrize(
    "kw, setting",
    [(dict(name="sgd"), "optim.name"), (dict(name="muon", muon_lr=0.0), "optim.muon_lr"),
     (dict(name="muon", muon_momentum=1.0), "optim.muon_momentum")],
)  # fmt: skip
def test_bad_settings_name_the_setting(kw, setting):
    with pytest.raises(FluxtrainError, match=setting):
        build_optimizer(tiny_model(), OptimConfig(**kw))


@pytest.mark.slow
def test_a_muon_run_resumed_from_its_checkpoint_matches_a_straight_run(tiny_cfg, tmp_path):
    # A constant learning rate after warm-up, so the schedule does not depend on train.max_iters.
    run = ["optim.name=muon", "optim.min_lr=3e-3", "train.max_iters=12", "train.eval_interval=6", "train.keep_last=0"]
    train(tiny_cfg(*run), tmp_path / "long")
    train(tiny_cfg(*run, "train.max_iters=6"), tmp_path / "short")
    # Another seed: a fresh start would draw other weights and batches, so only a real resume matches the long run.
    metrics = train(tiny_cfg(*run, "resume=auto", "train.seed=99"), tmp_path / "short")
    assert metrics["iters"] == 12
    a = read_model_file(tmp_path / "long" / "model_final.safetensors")[1]
    b = read_model_file(tmp_path / "short" / "model_final.safetensors")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_muon_on_a_torch_without_it_is_a_one_line_error(monkeypatch):
    from fluxtrain.optim import validate

    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(FluxtrainError, match=r"optim.name=muon needs torch.optim.Muon \(torch 2.9 or newer\)"):
        validate(OptimConfig(name="muon"))
