"""One-process scaling features on CPU: grad accumulation, precision flag, compile fallback, checkpointing, MFU."""

from __future__ import annotations

import functools
import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file

from fluxtrain import throughput
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig, flops_per_token
from fluxtrain.train import train

from .conftest import tb_scalars

SHORT = ["train.max_iters=8", "train.log_interval=1", "train.eval_interval=8", "train.eval_iters=2"]


def run_curve(tiny_cfg, run_dir, *overrides: str) -> list[float]:
    train(tiny_cfg(*SHORT, *overrides), run_dir)
    return list(tb_scalars(run_dir, "train/loss").values())


def assert_close(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol, (a, b)


def test_grad_accum_4_matches_4x_batch(tiny_cfg, tmp_path):
    # The 4 micro-batches of 2 are the 8 windows of the big batch, in the same order.
    accum = run_curve(tiny_cfg, tmp_path / "accum", "train.batch_size=2", "train.grad_accum=4")
    big = run_curve(tiny_cfg, tmp_path / "big", "train.batch_size=8")
    assert_close(accum, big, 1e-5)
    assert accum[-1] < accum[0]  # and it trains


def test_fp16_on_cpu_stays_fp32_with_a_notice(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        low = run_curve(tiny_cfg, tmp_path / "low", "train.precision=fp16")
    notices = [r.getMessage() for r in caplog.records if "needs CUDA" in r.getMessage()]
    assert notices == ["train.precision=fp16 needs CUDA; training in fp32 on cpu"]
    assert low == run_curve(tiny_cfg, tmp_path / "fp32", "train.precision=fp32")  # bit for bit: no autocast, no scaling


@pytest.mark.parametrize("batch_threads", [1, 2])
def test_bf16_on_cpu_trains_under_autocast(tiny_cfg, tmp_path, caplog, batch_threads):
    # fp32 runs repeat bit for bit (above); bf16 products round to 8 significant bits, so the curve moves off fp32's,
    # by little. On the batch threads too, where autocast must be entered on each part's own thread.
    threads = f"train.batch_threads={batch_threads}"
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        bf16 = run_curve(tiny_cfg, tmp_path / "bf16", "train.precision=bf16", threads)
    fp32 = run_curve(tiny_cfg, tmp_path / "fp32", "train.precision=fp32", threads)
    assert not any("needs" in r.getMessage() for r in caplog.records)
    assert any("(cpu bf16 matmul probe)" in r.getMessage() for r in caplog.records)
    assert 1e-6 < max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) < 0.05, (bf16, fp32)
    assert bf16[-1] < bf16[0]
    weights = load_file(tmp_path / "bf16" / "model_final.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}  # autocast: the weights stay fp32


def test_bf16_slower_than_fp32_on_this_cpu_gets_a_warning(monkeypatch):
    cpu = torch.device("cpu")
    rates = {torch.float32: 200e9, torch.bfloat16: 700e9}
    monkeypatch.setattr(throughput, "probe_peak", lambda device_type, dtype=torch.float32, **_: rates[dtype])
    assert throughput.slow_bf16_warning(cpu, "bf16") is None  # bf16 matrix instructions: faster
    rates[torch.bfloat16] = 40e9  # converted to fp32 operand by operand
    assert throughput.slow_bf16_warning(cpu, "bf16") == (
        "train.precision=bf16: this CPU multiplies bf16 matrices at 40.0 GFLOP/s, slower than 200.0 GFLOP/s in fp32; "
        "train.precision=fp32 trains faster here"
    )
    assert throughput.slow_bf16_warning(cpu, "fp32") is None
    assert throughput.peak_flops(cpu, None, "bf16") == (40e9, "cpu bf16 matmul probe")


def test_unknown_precision_is_an_error(tiny_cfg, tmp_path):
    with pytest.raises(FluxtrainError, match="train.precision='fp8' is not one of fp32, bf16, fp16"):
        train(tiny_cfg("train.precision=fp8"), tmp_path)


def test_unknown_compile_scope_is_an_error(tiny_cfg, tmp_path):
    with pytest.raises(FluxtrainError, match="train.compile_scope='layers' is not one of model, blocks"):
        train(tiny_cfg("train.compile_scope=layers"), tmp_path)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_failed_compile_falls_back_to_eager(tiny_cfg, tmp_path, caplog, monkeypatch, scope):
    class Broken:  # what a platform without a working compiler gives at the first call
        def __init__(self, model, **options):
            self._orig_mod = model

        def __call__(self, *args):
            raise RuntimeError("C compiler not found\nmore details")

    monkeypatch.setattr(torch, "compile", Broken)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        compiled = run_curve(tiny_cfg, tmp_path / "compiled", "train.compile=true", f"train.compile_scope={scope}")
    warnings = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert warnings == [
        "train.compile=true: torch.compile failed (RuntimeError: C compiler not found); training eagerly"
    ]
    assert compiled == run_curve(tiny_cfg, tmp_path / "eager")


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_training_matches_eager_and_saves_plain_names(tiny_cfg, tmp_path, monkeypatch, scope):
    # The eager backend runs the real torch.compile wrapper and graph capture without needing a C compiler.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled = run_curve(tiny_cfg, tmp_path / "compiled", "train.compile=true", f"train.compile_scope={scope}")
    assert_close(compiled, run_curve(tiny_cfg, tmp_path / "eager"), 1e-5)
    keys = load_file(str(tmp_path / "compiled" / "model_final.safetensors")).keys()
    assert "tok_emb.weight" in keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow
def test_inductor_with_its_cpp_wrapper_trains_like_eager(tiny_cfg, tmp_path, caplog, monkeypatch):
    # Real inductor, with the C++ wrapper that CPU runs get by default; no fallback may hide a failure here.
    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or real_compile(model, **kw))
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        compiled = run_curve(tiny_cfg, tmp_path / "compiled", "train.compile=true")
    assert not [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert calls == [{"options": {"cpp_wrapper": True}}]
    assert_close(compiled, run_curve(tiny_cfg, tmp_path / "eager"), 1e-4)


@pytest.mark.parametrize(("setting", "options"), [("false", None), ("true", {"cpp_wrapper": True})])
def test_cpp_wrapper_setting_reaches_torch_compile(tiny_cfg, tmp_path, monkeypatch, setting, options):
    calls = []
    eager_compile = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or eager_compile(model))
    run_curve(tiny_cfg, tmp_path, "train.compile=true", f"train.compile_cpp_wrapper={setting}")
    assert calls == [{"options": options}]


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=16, dropout=0.1)
    torch.manual_seed(0)
    model = GPT(cfg, 40)
    x = torch.randint(0, 40, (4, 16))
    y = torch.randint(0, 40, (4, 16))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks; checkpoint replays them in the recomputation
        model(x, y)[1].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_flag_reaches_the_model(tiny_cfg, tmp_path, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    checkpointed = run_curve(tiny_cfg, tmp_path / "ckpt", "train.activation_checkpointing=true")
    assert len(calls) == 8 * 2  # every block of every training step (evaluation does not checkpoint)
    assert_close(checkpointed, run_curve(tiny_cfg, tmp_path / "plain"), 1e-5)


LOG_LINE = re.compile(
    r"iter +\d+/\d+ \| loss \d+\.\d{4} \| lr \d\.\d\de[+-]\d\d \| [\d.]+ it/s \| [\d,]+ tok/s \| MFU \d+\.\d%$"
)


def test_log_line_and_tensorboard_report_mfu(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(tiny_cfg(*SHORT, "train.peak_flops=1e9"), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter")]
    assert len(lines) == 8 and all(LOG_LINE.match(line) for line in lines), lines
    assert any("peak 1.0 GFLOP/s per device (train.peak_flops)" in r.getMessage() for r in caplog.records)
    # MFU = tokens/s x FLOPs per token / peak, for the tiny model's shape and parameter count.
    n_params = json.loads((tmp_path / "metrics.json").read_text())["n_params"]
    per_token = flops_per_token(ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=16), n_params)
    tok_s, mfu = tb_scalars(tmp_path, "throughput/tokens_per_sec"), tb_scalars(tmp_path, "throughput/mfu")
    for step in tok_s:
        assert mfu[step] == pytest.approx(tok_s[step] * per_token / 1e9, rel=1e-5)


def test_an_mfu_above_100_percent_is_warned_about_once(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(tiny_cfg(*SHORT, "train.peak_flops=1"), tmp_path)  # 1 FLOP/s: every window reaches more
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "MFU" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert re.fullmatch(
        r"MFU \d+% is above 100%, so the MFU figures of this run are too high: train.peak_flops is below what this "
        r"device reaches",
        warnings[0],
    )
    probe = throughput.impossible_mfu_warning(1.3, "cpu matmul probe")
    assert probe.endswith(
        "the peak (cpu matmul probe) was measured while other work slowed this device; set train.peak_flops"
    )
    assert throughput.impossible_mfu_warning(0.99, "cpu matmul probe") is None
    table = throughput.impossible_mfu_warning(1.2, "NVIDIA H100 80GB HBM3 bf16 table")
    assert table.endswith(
        "the peak (NVIDIA H100 80GB HBM3 bf16 table) is below what this device reaches; set train.peak_flops"
    )


def test_peak_flops_sources():
    assert throughput.table_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.table_peak("NVIDIA H100 PCIe") == 756e12
    assert throughput.table_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert throughput.table_peak("NVIDIA H200") == 989e12
    assert throughput.table_peak("NVIDIA GeForce RTX 4090") is None
    assert throughput.peak_flops(torch.device("cpu"), 2e12, "fp32") == (2e12, "train.peak_flops")
    peak, source = throughput.peak_flops(torch.device("cpu"), None, "fp32")
    assert source == "cpu matmul probe" and 1e8 < peak < 1e14  # any CPU lies between 0.1 GFLOP/s and 100 TFLOP/s
    assert throughput.mfu(1000.0, 6_000_000, 1e10, world_size=2) == pytest.approx(0.3)


def test_a_known_gpu_uses_its_table_peak_only_for_half_precision(monkeypatch):
    """fp32 matmuls cannot use the tensor-core peak of the table: fp32 runs are measured against a probe."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(throughput, "probe_peak", lambda device_type, dtype=torch.float32, size=512, **_: 5e13)
    cuda = torch.device("cuda")
    assert throughput.peak_flops(cuda, None, "bf16") == (989e12, "NVIDIA H100 80GB HBM3 bf16 table")
    assert throughput.peak_flops(cuda, None, "fp16") == (989e12, "NVIDIA H100 80GB HBM3 bf16 table")
    assert throughput.peak_flops(cuda, None, "fp32") == (5e13, "NVIDIA H100 80GB HBM3 matmul probe")


def test_the_matmul_probe_outlasts_a_burst_of_other_work(monkeypatch):
    # A fake clock: the first 9 products (what a fixed count of runs would time) take 15 ms each, as when another
    # process holds the cores for a moment; after that each takes 2 ms. The probe must report the 2 ms rate.
    durations = iter([0.015] * 9 + [0.002] * 1000)
    now = [0.0]

    def perf_counter():
        return now[0]

    def product(a, b):
        now[0] += next(durations)
        return a.new_zeros(())

    monkeypatch.setattr(throughput.time, "perf_counter", perf_counter)
    monkeypatch.setattr(torch.Tensor, "__matmul__", product)
    peak = throughput.measure_peak("cpu", size=8, reps=8, min_seconds=0.2)
    assert peak == pytest.approx(2 * 8**3 / 0.002)


def test_the_cpu_peak_is_probed_on_the_threads_that_train(monkeypatch):
    """A sweep of train.threads=1,2 runs its jobs in one process: each job's MFU needs the peak of its own cores, not
    the first job's. Batch threads train on one core each, whatever train.threads says."""
    now, seen = [0.0], []

    def perf_counter():
        return now[0]

    def product(a, b):
        now[0] += 0.002
        seen.append(torch.get_num_threads())
        return a.new_zeros(())

    monkeypatch.setattr(throughput.time, "perf_counter", perf_counter)
    monkeypatch.setattr(torch.Tensor, "__matmul__", product)
    throughput._probed.cache_clear()
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for threads, measured_on in ((2, {2}), (1, {1}), (2, set()), (0, set())):  # then each measured once
            seen.clear()
            throughput.peak_flops(torch.device("cpu"), None, "fp32", threads)
            assert set(seen) == measured_on
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads_before)
        throughput._probed.cache_clear()


@pytest.mark.parametrize(
    ("settings", "cores"), [(["train.threads=1"], 1), (["train.threads=1", "train.batch_threads=2"], 2)]
)
def test_a_run_asks_for_the_peak_of_the_cores_it_trains_on(tiny_cfg, tmp_path, monkeypatch, settings, cores):
    asked = []
    real_peak_flops = throughput.peak_flops
    monkeypatch.setattr(throughput, "peak_flops", lambda *args: asked.append(args[3]) or real_peak_flops(*args))
    train(tiny_cfg("train.max_iters=2", "train.batch_size=4", *settings), tmp_path)
    assert asked == [cores]


def test_measuring_the_peak_leaves_training_unchanged(tiny_cfg, tmp_path):
    # With dropout the global RNG shapes training; the matmul probe, which runs once per process, must not draw from it.
    run = [*SHORT, "model.dropout=0.1"]
    throughput._probed.cache_clear()
    probed = run_curve(tiny_cfg, tmp_path / "probed", *run)  # this run measures the peak
    assert run_curve(tiny_cfg, tmp_path / "cached", *run) == probed  # this one reuses the measurement
    assert run_curve(tiny_cfg, tmp_path / "given", *run, "train.peak_flops=1e9") == probed


def test_bad_peak_flops_is_an_error(tiny_cfg, tmp_path):
    with pytest.raises(FluxtrainError, match="train.peak_flops=-1.0 must be a positive"):
        train(tiny_cfg("train.peak_flops=-1"), tmp_path)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_where_unavailable_is_a_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(FluxtrainError, match="train.device=mps: MPS is not available on this machine"):
        train(tiny_cfg("train.device=mps"), tmp_path)


def test_a_failed_whole_model_compile_with_activation_checkpointing_points_to_compiling_blocks(monkeypatch, caplog):
    from contextlib import nullcontext

    from fluxtrain.compile import compile_model

    def failing_compile(*args, **kwargs):
        raise RuntimeError("inductor cannot do this")

    monkeypatch.setattr(torch, "compile", failing_compile)
    model = GPT(ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, seq_len=8), vocab_size=11)
    x = torch.randint(11, (2, 8))
    hint = " (with train.activation_checkpointing=true, try train.compile_scope=blocks)"
    for checkpointing, end in ((False, "training eagerly"), (True, "training eagerly" + hint)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fluxtrain"):
            compiled = compile_model(model, model.blocks, x, x, nullcontext, activation_checkpointing=checkpointing)
        assert compiled is model
        (message,) = [r.getMessage() for r in caplog.records]
        assert message.startswith("train.compile=true: torch.compile failed (RuntimeError: inductor cannot do this)")
        assert message.endswith(end)
