"""train.batch_threads: a micro-batch split over CPU threads gives the full batch's gradients, reproducibly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from fluxtrain.batch_threads import BatchThreads, check, single_threaded
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.train import TrainConfig, train, validate

from .conftest import REPO_ROOT
from .test_resume import assert_same_weights

CFG = ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=16)


def model_and_batch(batch: int = 8) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(CFG, 20)
    window = torch.randint(20, (batch, CFG.seq_len + 1))
    return model, window[:, :-1], window[:, 1:]


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("n", [2, 4])
def test_parts_give_the_gradient_and_loss_of_the_whole_batch(n):
    model, x, y = model_and_batch()
    _, loss = model(x, y)
    (loss / 2).backward()
    whole = grads(model)
    model.zero_grad(set_to_none=True)

    params = list(model.parameters())
    with BatchThreads(n) as threads:
        split_loss = threads.forward_backward(model, params, x, y, 1 / 2)
        assert torch.allclose(split_loss, loss.detach(), atol=1e-6)
        for name, g in grads(model).items():
            assert torch.allclose(g, whole[name], atol=1e-6), name
        # A second micro-batch adds to the gradients held, as backward() does.
        threads.forward_backward(model, params, x, y, 1 / 2)
    for name, g in grads(model).items():
        assert torch.allclose(g, 2 * whole[name], atol=1e-6), name


def test_each_part_runs_under_the_autocast_it_is_given_on_its_own_thread():
    model, x, y = model_and_batch()
    seen = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append((threading.get_ident(), out.dtype)))
    with BatchThreads(2) as threads:
        threads.forward_backward(model, list(model.parameters()), x, y, 1.0)
        assert {dtype for _, dtype in seen} == {torch.float32}  # none given: fp32
        seen.clear()
        bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        threads.forward_backward(model, list(model.parameters()), x, y, 1.0, bf16)
    assert len({ident for ident, _ in seen}) == 2 and {dtype for _, dtype in seen} == {torch.bfloat16}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_the_parts_run_on_threads_of_one_torch_thread_each_and_the_caller_gets_its_threads_back():
    seen = []

    def part(i):
        seen.append((i, threading.get_ident(), torch.get_num_threads()))
        return i * 10

    threads_before = torch.get_num_threads()
    with BatchThreads(3) as threads:
        assert threads.map(part, [0, 1, 2]) == [0, 10, 20]
    assert sorted(i for i, _, _ in seen) == [0, 1, 2]
    assert len({ident for _, ident, _ in seen}) == 3
    assert {n for _, _, n in seen} == {1}
    assert torch.get_num_threads() == threads_before


def test_the_callers_own_thread_count_survives_the_workers_in_a_fresh_process():
    """torch sets a thread's count up at its first parallel op from the count any thread set last: the main thread of
    a new process must not take its workers' single thread (its evaluation and optimizer step would run on one)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def run(code: str) -> int:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)

    default = run("import torch; print(torch.get_num_threads())")
    if default == 1:
        pytest.skip("one core: nothing to lose")
    fresh = (
        "import time, torch\n"
        "from fluxtrain.batch_threads import BatchThreads\n"
        "threads = BatchThreads(2)\n"
        "time.sleep(0.3)\n"  # the worker has set its one thread by now
        "print(torch.get_num_threads())\n"
    )
    assert run(fresh) == default


def test_an_error_in_a_part_reaches_the_caller_and_the_threads_keep_working():
    def part(i):
        if i == 1:
            raise RuntimeError("part 1 failed")
        return i

    with BatchThreads(2) as threads:
        with pytest.raises(RuntimeError, match="part 1 failed"):
            threads.map(part, [0, 1])
        assert threads.map(lambda i: i + 1, [0, 1]) == [1, 2]


def test_single_threaded_restores_the_thread_count_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(ValueError), single_threaded():
        assert torch.get_num_threads() == 1
        raise ValueError
    assert torch.get_num_threads() == before


def test_runs_with_batch_threads_are_reproducible_resume_exactly_and_match_one_thread(tiny_cfg, tmp_path):
    common = ("train.max_iters=12", "train.log_interval=3", "train.eval_interval=6", "train.grad_accum=2")
    one = train(tiny_cfg(*common), tmp_path / "one")
    a = train(tiny_cfg(*common, "train.batch_threads=2"), tmp_path / "a")
    b = train(tiny_cfg(*common, "train.batch_threads=2"), tmp_path / "b")
    assert a["final_val_loss"] == b["final_val_loss"]
    assert_same_weights(tmp_path / "a" / "model_final.safetensors", tmp_path / "b" / "model_final.safetensors")
    assert a["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-5)

    # Stopped at iteration 6 and resumed: the same weights as the straight run.
    train(tiny_cfg(*common, "train.batch_threads=2", "train.max_iters=6"), tmp_path / "resumed")
    resumed = train(tiny_cfg(*common, "train.batch_threads=2", "resume=auto"), tmp_path / "resumed")
    assert resumed["final_val_loss"] == a["final_val_loss"]
    assert_same_weights(tmp_path / "a" / "model_final.safetensors", tmp_path / "resumed" / "model_final.safetensors")


@pytest.mark.slow
def test_a_compiled_model_trains_with_batch_threads_as_the_eager_one(tiny_cfg, tmp_path):
    common = ("train.max_iters=6", "train.eval_interval=6", "train.batch_threads=2")
    eager = train(tiny_cfg(*common), tmp_path / "eager")
    compiled = train(tiny_cfg(*common, "train.compile=true"), tmp_path / "compiled")
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-4)


def test_settings_batch_threads_cannot_serve_are_refused_in_one_line():
    with pytest.raises(FluxtrainError, match=r"train.batch_size=5 does not split into train.batch_threads=2"):
        validate(TrainConfig(batch_size=5, batch_threads=2))
    with pytest.raises(FluxtrainError, match=r"train.batch_threads=0 must be from 1 to"):
        validate(TrainConfig(batch_threads=0))
    cpu = torch.device("cpu")
    with pytest.raises(FluxtrainError, match="this run trains on cuda"):
        check(2, torch.device("cuda"), False, 0.0)
    with pytest.raises(FluxtrainError, match="under torchrun set it to 1"):
        check(2, cpu, True, 0.0)
    with pytest.raises(FluxtrainError, match="needs model.dropout=0"):
        check(2, cpu, False, 0.1)
    check(2, cpu, False, 0.0)  # fine


def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("batch-thread-")]


def test_a_refused_run_starts_no_threads_and_a_finished_or_failed_one_leaves_none(tiny_cfg, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(BatchThreads, "_work", lambda *a: started.append(1))
    with pytest.raises(FluxtrainError, match="needs model.dropout=0"):
        train(tiny_cfg("train.batch_threads=2", "model.dropout=0.1"), tmp_path / "refused")
    assert not started
    monkeypatch.undo()
    train(tiny_cfg("train.batch_threads=2", "train.max_iters=2"), tmp_path / "done")
    assert not workers()
    monkeypatch.setattr("fluxtrain.train.estimate_loss", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(tiny_cfg("train.batch_threads=2", "train.max_iters=2"), tmp_path / "failed")
    assert not workers()
