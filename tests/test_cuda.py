"""The CUDA paths: autocast bf16/fp16 training, compiled training, exact resume, the deferred loss check, decoding.

Skipped where torch sees no CUDA device (the CI machine); run on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

import pytest
import torch

from fluxtrain.checkpoint import load_checkpoint
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import load_model
from fluxtrain.quantize import quantize_int8
from fluxtrain.resume import checkpoint_path
from fluxtrain.sampling import SamplingConfig, generate
from fluxtrain.throughput import peak_flops
from fluxtrain.train import train

from .conftest import poison_training_loss, tb_scalars

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = ["train.device=cuda", "train.max_iters=20", "train.log_interval=5", "train.eval_interval=10"]


def curve(run_dir) -> list[float]:
    return list(tb_scalars(run_dir, "train/loss").values())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_lowers_the_loss_and_saves_a_portable_model(tiny_cfg, tmp_path, precision):
    metrics = train(tiny_cfg(*CUDA, f"train.precision={precision}"), tmp_path)
    losses = curve(tmp_path)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    assert metrics["final_val_loss"] < 3.5
    model, _ = load_model(tmp_path / "model_final.safetensors")  # weights saved from the GPU load on the CPU
    assert next(model.parameters()).device.type == "cpu"


def test_cuda_fp32_follows_the_cpu_curve(tiny_cfg, tmp_path):
    # No dropout, so both devices draw the same batches and compute the same function (to rounding).
    train(tiny_cfg(*CUDA), tmp_path / "cuda")
    train(tiny_cfg(*CUDA, "train.device=cpu"), tmp_path / "cpu")
    cuda, cpu = curve(tmp_path / "cuda"), curve(tmp_path / "cpu")
    assert max(abs(a - b) for a, b in zip(cuda, cpu, strict=True)) < 1e-3, (cuda, cpu)


def test_resume_on_cuda_continues_the_run(tiny_cfg, tmp_path):
    run = [*CUDA, "model.dropout=0.1", "train.precision=bf16", "train.keep_last=0", "train.ckpt_interval=10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(*run), straight)
    assert set(load_checkpoint(checkpoint_path(straight, 10)).rng) == {"torch", "batches", "cuda"}
    train(tiny_cfg(*run, f"resume={checkpoint_path(straight, 10)}"), resumed)
    a = load_model(straight / "model_final.safetensors")[0].state_dict()
    b = load_model(resumed / "model_final.safetensors")[0].state_dict()
    assert a.keys() == b.keys()
    # The same batches, dropout masks and optimizer state; only the attention backward's summation order may differ.
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-5), name
    assert curve(resumed)[-1] == pytest.approx(curve(straight)[-1], abs=1e-4)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_bf16_training_tracks_eager(tiny_cfg, tmp_path, scope):
    run = [*CUDA, "train.precision=bf16"]
    compiled = train(tiny_cfg(*run, "train.compile=true", f"train.compile_scope={scope}"), tmp_path / "c")
    eager = train(tiny_cfg(*run), tmp_path / "e")
    assert abs(compiled["final_val_loss"] - eager["final_val_loss"]) < 0.05, (compiled, eager)
    assert max(abs(a - b) for a, b in zip(curve(tmp_path / "c"), curve(tmp_path / "e"), strict=True)) < 0.05


def test_a_nan_loss_on_cuda_is_caught_at_its_iteration(tiny_cfg, tmp_path, monkeypatch):
    # On CUDA the losses reach the host only before logs and saves; the error still names the step it happened at.
    poison_training_loss(monkeypatch, 12, float("nan"))
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg(*CUDA, "train.log_interval=100", "train.ckpt_interval=7", "train.keep_last=0"), tmp_path)
    assert str(info.value).startswith("loss became nan at iteration 12;")
    assert f"the last good checkpoint is {checkpoint_path(tmp_path, 7)}" in str(info.value)
    assert not checkpoint_path(tmp_path, 14).exists()


def test_decoding_on_cuda_matches_without_the_cache_and_with_int8():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2, ff_dim=128, seq_len=32, pos_emb="rope")
    model = GPT(cfg, 50)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model = model.cuda().eval()
    greedy = SamplingConfig(max_new_tokens=100, temperature=0.0)
    cached = generate(model, [1, 2, 3], greedy)
    assert cached == generate(model, [1, 2, 3], greedy, use_cache=False)
    logits_fp32 = model(torch.tensor([[1, 2, 3, 4]], device="cuda"))[0]
    logits_int8 = quantize_int8(model)(torch.tensor([[1, 2, 3, 4]], device="cuda"))[0]
    assert (logits_int8 - logits_fp32).abs().max() < 0.05 * logits_fp32.abs().max()


def test_known_gpus_use_the_bf16_table():
    peak, source = peak_flops(torch.device("cuda"), None, "bf16")
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("A100", "H100", "H200")):
        assert source == f"{name} bf16 table" and peak > 3e14
    else:
        assert source == f"{name} matmul probe" and peak > 1e12
