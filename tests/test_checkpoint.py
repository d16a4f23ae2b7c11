"""Checkpoint files: round trip, unwrapped weights, atomic writes under SIGKILL, bad and malicious files, pruning."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from fluxtrain.checkpoint import Progress, load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state
from fluxtrain.errors import FluxtrainError
from fluxtrain.interrupt import GracefulStop, StoppedInSetup
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import CHECKPOINT_FORMAT, DIGEST_KEY, content_digest, load_model, save_model_file
from fluxtrain.optim import OptimConfig, build_optimizer
from fluxtrain.resume import checkpoint_path, find_latest, prune, resolve_resume
from fluxtrain.tokenizer import CharTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = CharTokenizer(list("abcdefghij"))
TINY = ModelConfig(d_model=16, n_heads=2, n_layers=2, ff_dim=32, seq_len=8, dropout=0.2)


def make_run_state(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(TINY, TOKENIZER.vocab_size)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, name="adamw"))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batch_gen = torch.Generator().manual_seed(seed)
    return model, optimizer, scaler, batch_gen


def train_step(model, optimizer, batch_gen) -> float:
    x = torch.randint(TOKENIZER.vocab_size, (4, TINY.seq_len), generator=batch_gen)
    _, loss = model(x, x)  # dropout draws from the global torch RNG
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def write_checkpoint(path: Path, seed: int = 0, steps: int = 2) -> tuple:
    model, optimizer, scaler, batch_gen = make_run_state(seed)
    for _ in range(steps):
        train_step(model, optimizer, batch_gen)
    progress = Progress(iteration=steps, best_val_loss=2.5, train_time=1.25, window_losses=[3.0, 2.75])
    config = {"model": {"d_model": 16}, "tokenizer": {"kind": "char"}}
    save_checkpoint(path, model, optimizer, scaler, rng_state(batch_gen), TOKENIZER, config, progress)
    return model, optimizer, batch_gen, progress, config


def test_round_trip_restores_everything_and_continues_identically(tmp_path):
    path = tmp_path / "iter_000002.ckpt"
    model, optimizer, batch_gen, progress, config = write_checkpoint(path)
    ckpt = load_checkpoint(path)
    assert ckpt.progress == progress and ckpt.config == config and ckpt.vocab_size == TOKENIZER.vocab_size

    model2, optimizer2, scaler2, batch_gen2 = make_run_state(seed=1)  # different weights and RNGs before restoring
    torch.manual_seed(123)
    assert restore(ckpt, model2, optimizer2, scaler2, batch_gen2) == progress
    for (name, p), p2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(p, p2), name
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)
    # The next step (dropout masks, batch and Adam update) is the same bit for bit.
    restored_loss = train_step(model2, optimizer2, batch_gen2)
    torch.set_rng_state(ckpt.rng["torch"])  # the global RNG as it was when the original run saved
    assert train_step(model, optimizer, batch_gen) == restored_loss
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2)


def test_checkpoint_loads_as_a_model_file(tmp_path):
    path = tmp_path / "iter_000002.ckpt"
    model = write_checkpoint(path)[0]
    loaded, tokenizer = load_model(path)
    assert tokenizer.to_json() == TOKENIZER.to_json()
    for (name, p), p2 in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, p2), name


def test_compiled_and_ddp_wrapped_weights_have_plain_names(tmp_path):
    model, optimizer, scaler, batch_gen = make_run_state()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = {"compiled": torch.compile(model), "ddp": torch.nn.parallel.DistributedDataParallel(model)}
        wrapped["compiled_ddp"] = torch.compile(wrapped["ddp"])
        for name, w in wrapped.items():
            ckpt_file, model_file = tmp_path / f"{name}.ckpt", tmp_path / f"{name}.safetensors"
            save_checkpoint(ckpt_file, w, optimizer, scaler, rng_state(batch_gen), TOKENIZER, {}, Progress())
            save_model_file(model_file, w, TOKENIZER)
            ckpt = load_checkpoint(ckpt_file)
            assert not [k for k in ckpt.model if "_orig_mod" in k or k.startswith("module.")], name
            plain = GPT(TINY, TOKENIZER.vocab_size)
            restore(ckpt, plain, build_optimizer(plain, OptimConfig()), scaler, torch.Generator())
            loaded, _ = load_model(model_file)
            for p, p1, p2 in zip(model.parameters(), plain.parameters(), loaded.parameters(), strict=True):
                assert torch.equal(p, p1) and torch.equal(p, p2), name
    finally:
        dist.destroy_process_group()


def test_non_finite_weights_are_never_saved(tmp_path):
    model, optimizer, scaler, batch_gen = make_run_state()
    with torch.no_grad():
        model.blocks[1].mlp.fc.weight[0, 0] = float("nan")
    path = tmp_path / "iter_000001.ckpt"
    with pytest.raises(FluxtrainError, match=r"blocks\.1\.mlp\.fc\.weight holds NaN"):
        save_checkpoint(path, model, optimizer, scaler, rng_state(batch_gen), TOKENIZER, {}, Progress())
    assert list(tmp_path.iterdir()) == []


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A file for each way a checkpoint can be bad, with the phrase its error must hold."""
    good = tmp_path / "good.ckpt"
    write_checkpoint(good)
    data = good.read_bytes()
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, content: bytes, phrase: str) -> None:
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(content)
        files[name] = (path, phrase)

    files["missing"] = (tmp_path / "missing.ckpt", "does not exist")
    add("empty", b"", "is empty")
    add("truncated", data[: len(data) // 2], "is not a readable safetensors checkpoint")
    add("random", os.urandom(4096), "is not a readable safetensors checkpoint")
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # one byte of tensor data
    add("bit_flip", bytes(flipped), "is corrupt")
    header_edit = data.replace(b'"iteration\\": 2', b'"iteration\\": 7', 1)  # still valid JSON, wrong content
    assert header_edit != data
    add("metadata_edit", header_edit, "is corrupt")
    torch.save({"model": {"w": torch.zeros(3)}}, tmp_path / "pickled.ckpt")
    files["pickled"] = (tmp_path / "pickled.ckpt", "is not a readable safetensors checkpoint")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.ckpt"))
    files["foreign"] = (tmp_path / "foreign.ckpt", "is not a fluxtrain checkpoint")
    save_model_file(tmp_path / "model.ckpt", GPT(TINY, TOKENIZER.vocab_size), TOKENIZER)
    files["model_file"] = (tmp_path / "model.ckpt", "is a model file, not a training checkpoint")
    save_file({"model/w": torch.zeros(3)}, str(tmp_path / "no_meta.ckpt"), metadata={"format": CHECKPOINT_FORMAT})
    files["damaged_metadata"] = (tmp_path / "no_meta.ckpt", "damaged checkpoint metadata")
    # Crafted files whose checksum matches their content: the checks behind the checksum still name the problem.
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    progress = json.loads(meta["progress"])
    nan_weight = tensors["model/blocks.0.mlp.fc.weight"].clone()
    nan_weight[0, 0] = float("nan")
    float8_weight = tensors["model/blocks.0.mlp.fc.weight"].to(torch.float8_e4m3fn)
    for name, meta_changes, tensor_changes, phrase in (
        ("text_iteration", {"progress": json.dumps({**progress, "iteration": "7"})}, {}, "progress has iteration='7'"),
        ("list_config", {"config": "[1, 2]"}, {}, "its run config is not a JSON object"),
        ("float_rng", {}, {"rng/torch": torch.zeros(8)}, "rng/torch is not a byte vector"),
        ("short_rng", {}, {"rng/batches": torch.zeros(5, dtype=torch.uint8)}, "rng/batches has 5 bytes"),
        (
            "zero_rank_rng",  # another rank's: refused at loading, before any rank sets a file aside
            {},
            {"rng/rank1/torch": torch.zeros_like(tensors["rng/torch"])},
            "rng/rank1/torch is not a CPU generator's state",
        ),
        ("nan_weights", {}, {"model/blocks.0.mlp.fc.weight": nan_weight}, "holds NaN or infinite values"),
        ("float8_weights", {}, {"model/blocks.0.mlp.fc.weight": float8_weight}, "is stored as float8_e4m3fn"),
        ("list_scaler", {"scaler": "[1]"}, {}, "its grad-scaler state is not a JSON object"),
    ):
        crafted_meta, crafted = {**meta, **meta_changes}, {**tensors, **tensor_changes}
        crafted_meta[DIGEST_KEY] = content_digest(crafted, crafted_meta)
        save_file(crafted, str(tmp_path / f"{name}.ckpt"), metadata=crafted_meta)
        files[name] = (tmp_path / f"{name}.ckpt", phrase)
    return files


def test_bad_files_give_one_line_errors_naming_the_file_and_the_problem(tmp_path):
    for name, (path, phrase) in bad_files(tmp_path).items():
        with pytest.raises(FluxtrainError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert phrase in message and str(path) in message and "\n" not in message, (name, message)


def without_checksum(path: Path, tensor_changes: dict[str, torch.Tensor]) -> Path:
    """A copy of the checkpoint at `path` with `tensor_changes` and no checksum, as a hand-edited file may be."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta[DIGEST_KEY]
    edited = path.with_name(f"edited_{path.name}")
    save_file({**tensors, **tensor_changes}, str(edited), metadata=meta)
    return edited


def test_optimizer_state_of_another_shape_than_its_parameter_is_named(tmp_path):
    path = tmp_path / "iter_000002.ckpt"
    write_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        exp_avg = f.get_tensor("optim/0/exp_avg")
    edited = without_checksum(path, {"optim/0/exp_avg": exp_avg[:, :3].contiguous()})
    with pytest.raises(FluxtrainError) as info:
        restore(load_checkpoint(edited), *make_run_state())
    assert str(info.value) == (
        f"{edited}: optimizer state does not fit this optimizer (optim/0/exp_avg has shape "
        f"({exp_avg.shape[0]}, 3), its parameter {tuple(exp_avg.shape)})"
    )


def test_optimizer_state_of_no_parameter_missing_or_of_another_dtype_is_named(tmp_path):
    """Torch would load each of these and fail at the first step, with a traceback, or not at all."""
    path = tmp_path / "iter_000002.ckpt"
    write_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        exp_avg = f.get_tensor("optim/0/exp_avg")
    n_params = len(list(make_run_state()[0].parameters()))
    for changes, removed, problem in (
        ({"optim/99/exp_avg": torch.zeros(3)}, None, f"optim/99 is the state of none of the checkpoint's {n_params}"),
        ({}, "optim/0/exp_avg", "optim/0/exp_avg is missing (other parameters of its group have it)"),
        ({"optim/0/exp_avg": exp_avg.long()}, None, "optim/0/exp_avg is stored as int64"),
    ):
        edited = without_checksum(path, changes)
        if removed:
            with safe_open(str(edited), framework="pt") as f:
                meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != removed}
            save_file(tensors, str(edited), metadata=meta)
        with pytest.raises(FluxtrainError) as info:
            restore(load_checkpoint(edited), *make_run_state())
        assert str(info.value).startswith(f"{edited}: optimizer state does not fit this optimizer ({problem}"), problem


def test_optimizer_state_that_is_not_finite_or_a_negative_mean_of_squares_is_named(tmp_path):
    """Such a state loads into torch and turns the first step's weights into NaN: a divergence blamed on the lr."""
    path = tmp_path / "iter_000002.ckpt"
    write_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        exp_avg, exp_avg_sq = f.get_tensor("optim/0/exp_avg"), f.get_tensor("optim/0/exp_avg_sq")
    for changes, problem in (
        ({"optim/0/exp_avg": torch.full_like(exp_avg, float("nan"))}, "optim/0/exp_avg holds NaN or infinite values"),
        ({"optim/0/exp_avg_sq": -exp_avg_sq - 1}, "optim/0/exp_avg_sq (a mean of squares) holds negative values"),
    ):
        edited = without_checksum(path, changes)
        with pytest.raises(FluxtrainError) as info:
            load_checkpoint(edited)
        assert str(info.value) == f"{edited}: its optimizer state {problem}"


def with_metadata(path: Path, name: str, **changes: str) -> Path:
    """A copy of the checkpoint at `path` with some metadata entries replaced, and no checksum."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edited = path.with_name(name)
    save_file(tensors, str(edited), metadata={**{k: v for k, v in meta.items() if k != DIGEST_KEY}, **changes})
    return edited


def test_progress_and_run_config_that_do_not_hold_up_are_named(tmp_path):
    path = tmp_path / "iter_000002.ckpt"
    write_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    progress, config = json.loads(meta["progress"]), json.loads(meta["config"])
    deep = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit
    for changes, problem in (
        ({"progress": json.dumps({**progress, "iteration": -5})}, "its progress is damaged: iteration=-5 is negative"),
        ({"progress": json.dumps({**progress, "train_time": -3.0})}, "train_time=-3.0 is not a number of seconds"),
        ({"progress": json.dumps({**progress, "wall_time": math.inf})}, "wall_time=inf is not a number of seconds"),
        ({"progress": json.dumps({**progress, "best_val_loss": math.nan})}, "best_val_loss=nan is not a loss"),
        ({"progress": json.dumps({**progress, "window_losses": [1.0, math.nan]})}, "window_losses holds NaN"),
        ({"progress": "{}"}, "its progress has no iteration"),
        ({"progress": deep}, "damaged checkpoint metadata (ValueError: JSON nested too deeply)"),
        ({"config": json.dumps({**config, "train": "x"})}, "its run config's train section is not a JSON object"),
        ({"config": json.dumps({**config, "tokenizer": [1]})}, "its run config's tokenizer section is not a JSON"),
    ):
        edited = with_metadata(path, "edited.ckpt", **changes)
        with pytest.raises(FluxtrainError) as info:
            load_checkpoint(edited)
        assert str(info.value).startswith(f"{edited}: ") and problem in str(info.value), str(info.value)
    assert load_checkpoint(with_metadata(path, "fine.ckpt", progress=json.dumps(progress))).progress.iteration == 2


def test_a_grad_scaler_state_that_does_not_fit_is_named(tmp_path):
    path = tmp_path / "iter_000002.ckpt"
    write_checkpoint(path)
    ckpt = load_checkpoint(path)
    ckpt.scaler = {"scale": 1024.0}  # a JSON object, but not all of a GradScaler's state
    model, optimizer, _, batch_gen = make_run_state()
    with pytest.raises(FluxtrainError, match=re.escape(f"{path}: its grad-scaler state cannot be restored (")):
        restore(ckpt, model, optimizer, torch.amp.GradScaler("cpu", enabled=True), batch_gen)


def test_a_random_number_state_that_does_not_fit_is_named(tmp_path):
    path = tmp_path / "iter_000002.ckpt"
    write_checkpoint(path)
    edited = without_checksum(path, {"rng/batches": torch.zeros(5, dtype=torch.uint8)})
    with pytest.raises(FluxtrainError, match=re.escape(f"{edited}: its random-number state rng/batches has 5 bytes")):
        load_checkpoint(edited)
    ckpt = load_checkpoint(path)
    ckpt.rng["batches"] = torch.zeros(5, dtype=torch.uint8)  # past the file checks: restoring it still names the file
    with pytest.raises(FluxtrainError, match=re.escape(f"{path}: its random-number state cannot be restored (")):
        restore(ckpt, *make_run_state())


class RunsCode:
    """An object whose unpickling runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_cfg):
    marker = tmp_path / "code_ran"
    run_dir = tmp_path / "run"
    evil = checkpoint_path(run_dir, 10)
    evil.parent.mkdir(parents=True)
    torch.save({"model": RunsCode(marker), "iteration": 10}, evil)
    raw_pickle = tmp_path / "raw_pickle.ckpt"
    raw_pickle.write_bytes(pickle.dumps({"model": RunsCode(marker)}))

    from fluxtrain.train import train

    for path in (evil, raw_pickle):
        with pytest.raises(FluxtrainError, match="not a readable safetensors checkpoint"):
            load_checkpoint(path)
        with pytest.raises(FluxtrainError, match="not a readable safetensors model file"):
            load_model(path)
    with pytest.raises(FluxtrainError, match=re.escape(str(evil))):
        train(tiny_cfg("resume=auto"), run_dir)
    assert not marker.exists()
    # The file is really dangerous: an unsafe load runs its code.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran"


def test_the_gpu_rng_state_is_restored_into_the_training_gpu_from_either_layout(monkeypatch):
    """Checked without a GPU: which saved state goes into which device. Newer checkpoints hold the training GPU's
    state as "cuda"; older ones every GPU's as the saving process saw them ("cuda/<index>")."""
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    base = {"torch": torch.get_rng_state(), "batches": torch.Generator().get_state()}
    newer = {**base, "cuda": torch.tensor([7], dtype=torch.uint8)}
    older = {**base, "cuda/0": torch.tensor([10], dtype=torch.uint8), "cuda/1": torch.tensor([11], dtype=torch.uint8)}
    for rng, device in [(newer, "cuda:1"), (older, "cuda:1"), (older, "cuda"), (newer, "cpu"), (base, "cuda")]:
        set_rng_state(rng, torch.Generator(), torch.device(device))
    assert restored == [(7, torch.device("cuda:1")), (11, torch.device("cuda:1")), (10, torch.device("cuda"))]


KILL_WRITER = """
import sys, torch
from fluxtrain.checkpoint import Progress, rng_state, save_checkpoint
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.optim import OptimConfig, build_optimizer
from fluxtrain.tokenizer import CharTokenizer

run_dir = sys.argv[1]
model = GPT(ModelConfig(d_model=256, n_heads=4, n_layers=4, ff_dim=1024, seq_len=64), 65)
optimizer = build_optimizer(model, OptimConfig())
model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
optimizer.step()  # Adam state: the checkpoint is about 3x the weights
tokenizer = CharTokenizer([chr(i) for i in range(65)])
args = (torch.amp.GradScaler("cuda", enabled=False), rng_state(torch.Generator()), tokenizer)
save_checkpoint(f"{run_dir}/checkpoints/iter_000001.ckpt", model, optimizer, *args, {}, Progress(iteration=1))
print("ready", flush=True)
while True:  # rewrite the next checkpoint until killed
    save_checkpoint(f"{run_dir}/checkpoints/iter_000002.ckpt", model, optimizer, *args, {}, Progress(iteration=2))
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_previous_checkpoints_loadable(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_WRITER, str(run_dir)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        full_size = (run_dir / "checkpoints" / "iter_000001.ckpt").stat().st_size
        assert full_size > 30_000_000
        deadline, partial = time.monotonic() + 120, None
        while partial is None and time.monotonic() < deadline:
            for tmp in (run_dir / "checkpoints").glob(".iter_000002.ckpt.*.tmp"):
                try:
                    size = tmp.stat().st_size
                except FileNotFoundError:
                    continue
                if 0 < size < full_size * 0.9:
                    os.kill(proc.pid, signal.SIGKILL)
                    partial = tmp
                    break
        assert partial is not None, "never saw a checkpoint half written"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < partial.stat().st_size < full_size  # the kill landed mid-write
    assert load_checkpoint(run_dir / "checkpoints" / "iter_000001.ckpt").progress.iteration == 1
    latest = find_latest(run_dir)  # iter_000002 if an earlier rewrite completed, else iter_000001
    assert load_checkpoint(latest).progress.iteration == int(latest.stem[5:])
    assert resolve_resume("auto", run_dir) == latest
    assert partial in prune(run_dir, keep_last=3) and not partial.exists()


def test_prune_keeps_the_newest_and_removes_dead_temp_files(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for it in (5, 10, 100, 15, 1000):
        checkpoint_path(tmp_path, it).write_bytes(b"x")
    (folder / ".iter_001005.ckpt.abc123.tmp").write_bytes(b"partial")
    (folder / "notes.txt").write_text("kept")
    assert prune(tmp_path, keep_last=0) == [folder / ".iter_001005.ckpt.abc123.tmp"]
    assert len(list(folder.glob("iter_*.ckpt"))) == 5
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in folder.iterdir()) == ["iter_000100.ckpt", "iter_001000.ckpt", "notes.txt"]
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 1000)


def test_resume_setting_resolves_to_a_checkpoint_or_a_fresh_start(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing to resume: start fresh
    with pytest.raises(FluxtrainError, match="resume=.*nope.ckpt: no such checkpoint file"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)
    checkpoint_path(tmp_path, 7).parent.mkdir()
    checkpoint_path(tmp_path, 7).write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == checkpoint_path(tmp_path, 7)


def test_first_signal_asks_to_stop_second_stops_at_once():
    previous, previous_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        stop.install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
        assert signal.getsignal(signal.SIGINT) is previous
    with GracefulStop() as stop:
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert info.value.code == 128 + signal.SIGTERM
    with GracefulStop() as stop:
        stop.install()
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGINT) is previous and signal.getsignal(signal.SIGTERM) is previous_term


def test_sigterm_before_the_loop_stops_at_once_with_the_status_of_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StoppedInSetup) as info, GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs here at the latest
    assert info.value.code == 128 + signal.SIGTERM and not stop.requested
    assert not isinstance(info.value, Exception)  # no `except Exception` on the way takes it for a failure
    assert signal.getsignal(signal.SIGTERM) is previous
    with GracefulStop() as stop:  # once the loop's handler is in, SIGTERM only asks the loop to stop
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is previous
