"""torchrun on CPU (gloo, 2 ranks): DDP and FSDP match one process, ranks share one run folder, a crash ends the job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fluxtrain import distributed
from fluxtrain.checkpoint import Progress, load_checkpoint, restore, rng_state, save_checkpoint
from fluxtrain.data import TokenData
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import is_sharded, load_model, model_state
from fluxtrain.optim import OptimConfig, build_optimizer
from fluxtrain.resume import checkpoint_path
from fluxtrain.tokenizer import CharTokenizer
from fluxtrain.train import train

from .conftest import REPO_ROOT, TINY_OVERRIDES, compose_config, make_text, tb_scalars

ITERS = 8
# Both sides see the same windows: one process draws 8 per step, each of 2 ranks keeps its half of those 8.
RUN_OVERRIDES = [
    *TINY_OVERRIDES,
    f"train.max_iters={ITERS}",
    "train.log_interval=1",
    "train.eval_interval=4",
    "train.eval_iters=2",
    "optim.warmup_iters=2",
]


def torchrun(
    cwd: Path,
    overrides: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 300,
    entry: tuple[str, ...] = ("-m", "fluxtrain"),
):
    """`torchrun --standalone --nproc_per_node=2 -m fluxtrain ...` (or another `entry`) on CPU, from `cwd`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry]
    # PYTHONFAULTHANDLER: a rank killed by a signal (SIGABRT, SIGSEGV) prints where each of its threads was.
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        **(env or {}),
    }
    return subprocess.run(
        [*cmd, *overrides], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def loss_curve(run_dir: Path) -> list[float]:
    """train/loss of every logged iteration; rank 0 alone writes TensorBoard, so there is one events file."""
    return list(tb_scalars(run_dir, "train/loss").values())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    """One process, batch 8, no accumulation."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(compose_config([*RUN_OVERRIDES, f"data.path={corpus}", "train.batch_size=8"]), run_dir)
    return run_dir


def test_rank_batches_split_the_single_process_batch():
    data = TokenData(np.arange(900), np.arange(900, 1000), 16, "test", 100)
    whole_x, whole_y = data.get_batch("train", 8, torch.Generator().manual_seed(3))
    parts = [
        distributed.rank_batch(data, 4, torch.Generator().manual_seed(3), distributed.World(rank, rank, 2))
        for rank in (0, 1)
    ]
    assert not torch.equal(parts[0][0], parts[1][0])  # every rank trains on different windows
    assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
    assert torch.equal(torch.cat([y for _, y in parts]), whole_y)


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory) -> Path:
    """2 ranks x batch 4 (DDP) with a checkpoint at iteration 4; the run folder is named by `${now:}` in microseconds,
    so without the shared run folder the two ranks would each pick their own. Returns the parent of the run folder."""
    cwd = tmp_path_factory.mktemp("ddp")
    overrides = [*RUN_OVERRIDES, f"data.path={corpus}", "train.batch_size=4", "train.ckpt_interval=4"]
    result = torchrun(cwd, [*overrides, "hydra.run.dir=out/${now:%H-%M-%S-%f}"])
    assert result.returncode == 0, result.stderr[-12000:]
    return cwd / "out"


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_with_double_batch(reference_run, ddp_run):
    run_dirs = list(ddp_run.iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]

    ddp, single = loss_curve(run_dir), loss_curve(reference_run)
    assert len(ddp) == len(single) == ITERS
    assert max(abs(a - b) for a, b in zip(ddp, single, strict=True)) < 1e-5, (ddp, single)
    # Evaluation too: each rank evaluates its half of the windows one process evaluates, and they report the mean.
    for tag in ("val/loss", "train/eval_loss"):
        ddp_eval, single_eval = tb_scalars(run_dir, tag), tb_scalars(reference_run, tag)
        assert sorted(ddp_eval) == sorted(single_eval) == [4, 8]
        assert max(abs(ddp_eval[step] - single_eval[step]) for step in single_eval) < 1e-5, (ddp_eval, single_eval)

    log = (run_dir / "train.log").read_text()
    assert "tokens per optimizer step: 128 (batch 4 x accum 1 x 2 rank(s) x seq 16)" in log
    assert log.count("done:") == 1  # only rank 0 logs
    weights = load_file(str(run_dir / "model_final.safetensors"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    reference = load_file(str(reference_run / "model_final.safetensors"))
    assert max((weights[k] - reference[k]).abs().max().item() for k in reference) < 1e-4


@pytest.mark.slow
def test_resume_in_one_process_from_a_two_rank_checkpoint(reference_run, ddp_run, corpus, tmp_path):
    (run_dir,) = ddp_run.iterdir()
    ckpt = checkpoint_path(run_dir, 4)
    train(compose_config([*RUN_OVERRIDES, f"data.path={corpus}", "train.batch_size=8", f"resume={ckpt}"]), tmp_path)
    resumed, single = tb_scalars(tmp_path, "train/loss"), tb_scalars(reference_run, "train/loss")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert max(abs(resumed[step] - single[step]) for step in resumed) < 1e-5, (resumed, single)


@pytest.mark.slow
def test_fsdp_with_grad_accum_resumes_and_matches_one_process(reference_run, ddp_run, corpus, tmp_path):
    # From the DDP run's checkpoint at iteration 4: 2 ranks x 2 micro-steps x batch 2 = the reference's 8 windows.
    (ddp_dir,) = ddp_run.iterdir()
    overrides = [*RUN_OVERRIDES, f"data.path={corpus}", "train.strategy=fsdp", "train.batch_size=2"]
    resume = f"resume={checkpoint_path(ddp_dir, 4)}"
    sample = "train.sample_interval=8"  # after the last step: decoding a sharded model, on every rank
    # A checkpoint mid-run (iteration 7) gathers the optimizer's shards; training then goes on with them. Logged
    # every 3 iterations, it holds the loss of iteration 7, not logged yet.
    mid_ckpt, logs = "train.ckpt_interval=7", "train.log_interval=3"
    result = torchrun(tmp_path, [*overrides, "train.grad_accum=2", sample, mid_ckpt, logs, resume, "hydra.run.dir=run"])
    assert result.returncode == 0, result.stderr[-12000:]
    run_dir = tmp_path / "run"
    assert "sample at iteration 8:" in (run_dir / "train.log").read_text()
    # The reference logged every step; a logged loss is the mean of the steps since the last log line.
    single = tb_scalars(reference_run, "train/loss")
    fsdp, expected = tb_scalars(run_dir, "train/loss"), {6: (single[5] + single[6]) / 2, 8: (single[7] + single[8]) / 2}
    assert sorted(fsdp) == [6, 8]
    assert max(abs(fsdp[step] - expected[step]) for step in fsdp) < 1e-5, (fsdp, expected)
    # The checkpoint at 7 holds the loss of iteration 7 over both ranks' windows, not rank 0's half of them: resumed
    # in one process, the log line at 8 is that of the reference.
    overrides = [*RUN_OVERRIDES, f"data.path={corpus}", "train.batch_size=8", logs]
    train(compose_config([*overrides, f"resume={checkpoint_path(run_dir, 7)}"]), tmp_path / "one")
    assert tb_scalars(tmp_path / "one", "train/loss")[8] == pytest.approx(expected[8], abs=1e-5)

    # Model files and checkpoints hold the whole, gathered weights and optimizer state, loadable in one process.
    model, _ = load_model(run_dir / "model_final.safetensors")
    reference, _ = load_model(reference_run / "model_final.safetensors")
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p - q).abs().max().item() < 1e-4, name
    ckpt = load_checkpoint(checkpoint_path(run_dir, 8))
    reference_ckpt = load_checkpoint(checkpoint_path(reference_run, 8))
    for index, state in reference_ckpt.optimizer["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert ckpt.optimizer["state"][index][name].shape == state[name].shape
            assert (ckpt.optimizer["state"][index][name] - state[name]).abs().max().item() < 1e-4


@pytest.fixture
def sharded_in_one_process(tmp_path):
    """A process group of one rank (gloo), in which fully_shard shards a model as it would over several."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_whose_weights_do_not_fit_a_sharded_model_is_refused_naming_them(tmp_path, sharded_in_one_process):
    from torch.distributed.fsdp import fully_shard

    tokenizer = CharTokenizer(list("abcdefghij"))
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, seq_len=8)
    path = tmp_path / "iter_000001.ckpt"
    saved = GPT(cfg, tokenizer.vocab_size)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    optimizer = build_optimizer(saved, OptimConfig())
    save_checkpoint(path, saved, optimizer, scaler, rng_state(torch.Generator()), tokenizer, {}, Progress())

    def restore_sharded(ckpt):
        model = GPT(cfg, tokenizer.vocab_size)
        fully_shard(model)
        assert is_sharded(model)
        restore(ckpt, model, build_optimizer(model, OptimConfig()), scaler, torch.Generator())
        return model

    missing = load_checkpoint(path)
    del missing.model["blocks.0.ln1.weight"]
    with pytest.raises(FluxtrainError, match=r"weights do not fit the model \(missing \['blocks\.0\.ln1\.weight'\]"):
        restore_sharded(missing)
    reshaped = load_checkpoint(path)
    reshaped.model["pos_emb.weight"] = reshaped.model["pos_emb.weight"][:4]
    with pytest.raises(FluxtrainError, match=r"weight pos_emb\.weight has shape \(4, 16\), the model needs \(8, 16\)"):
        restore_sharded(reshaped)
    restored = model_state(restore_sharded(load_checkpoint(path)))  # a checkpoint that fits still loads
    assert all(torch.equal(restored[k], v) for k, v in model_state(saved).items())


@pytest.mark.slow
def test_each_rank_has_its_own_dropout_masks_and_a_resume_continues_them_exactly(corpus, tmp_path):
    overrides = [*RUN_OVERRIDES, f"data.path={corpus}", "train.batch_size=4", "model.dropout=0.3"]
    whole = torchrun(tmp_path, [*overrides, "train.ckpt_interval=4", "hydra.run.dir=whole"])
    assert whole.returncode == 0, whole.stderr[-12000:]
    rng = load_checkpoint(checkpoint_path(tmp_path / "whole", 4)).rng
    assert sorted(rng) == ["batches", "rank1/torch", "torch"] and not torch.equal(rng["torch"], rng["rank1/torch"])
    resume = f"resume={checkpoint_path(tmp_path / 'whole', 4)}"
    resumed = torchrun(tmp_path, [*overrides, resume, "hydra.run.dir=resumed"])
    assert resumed.returncode == 0, resumed.stderr[-12000:]
    curve, continued = tb_scalars(tmp_path / "whole", "train/loss"), tb_scalars(tmp_path / "resumed", "train/loss")
    assert sorted(continued) == [5, 6, 7, 8]
    assert all(continued[step] == curve[step] for step in continued), (continued, curve)


@pytest.mark.slow
def test_a_time_budget_stops_every_rank_at_the_same_step(corpus, tmp_path):
    overrides = [*TINY_OVERRIDES, f"data.path={corpus}", "train.max_iters=100000", "train.max_time=12"]
    result = torchrun(tmp_path, [*overrides, "train.log_interval=10", "hydra.run.dir=run"], timeout=240)
    assert result.returncode == 0, result.stderr[-12000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("done:") == 1 and "time budget 12s" in log
    assert load_checkpoint(next((tmp_path / "run" / "checkpoints").glob("iter_*.ckpt"))).progress.iteration > 10


@pytest.mark.slow
def test_crashing_rank_ends_the_job_with_an_error(corpus, tmp_path):
    overrides = [*TINY_OVERRIDES, f"data.path={corpus}", "train.max_iters=100000", "hydra.run.dir=run"]
    start = time.monotonic()
    result = torchrun(tmp_path, overrides, env={distributed.FAULT_ENV: "1:3"}, timeout=240)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 fails at training forward 3" in result.stderr
    assert elapsed < 180  # torchrun stops rank 0, which would otherwise wait for rank 1 forever


def test_a_torchrun_job_refused_at_setup_leaves_no_folder_behind(corpus, tmp_path):
    result = torchrun(tmp_path, [*TINY_OVERRIDES, f"data.path={corpus}", "train.strategy=zero"], timeout=240)
    assert result.returncode != 0
    assert "error: train.strategy='zero' is not one of ddp, fsdp" in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/, not even from the later rank's Hydra


@pytest.mark.parametrize("at", ["data", "run_dir"])
def test_a_signal_to_one_rank_in_setup_ends_the_job_and_leaves_no_folder_behind(corpus, tmp_path, at):
    """SIGTERM to rank 1 as it reads the data, or SIGINT as it waits for rank 0's run folder (before Hydra runs)."""
    script = str(REPO_ROOT / "tests" / "signal_in_setup.py")
    overrides = [*TINY_OVERRIDES, f"data.path={corpus}", "hydra.run.dir=run"]
    result = torchrun(tmp_path, overrides, env={"SIGNAL_AT": at}, entry=(script,))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Rank 0 says another rank ended (reading the data, rank 1 stays quiet); before Hydra, rank 1 says it stopped,
    # and rank 0, stopped by torchrun at any moment of its setup, may not get to say anything.
    assert ("stopped: another rank of this torchrun job ended" if at == "data" else "interrupted\n") in output
    assert "Error executing job" not in output and "Connection closed" not in output  # no rank's traceback
    assert list(tmp_path.iterdir()) == []  # neither rank claimed the folder: it goes


@pytest.mark.parametrize("option", ["--cfg=job", "--info=searchpath"])
def test_an_option_that_runs_nothing_ends_every_rank_in_either_form(tmp_path, option):
    """No rank waits for a run folder that rank 0, printing the config, never makes."""
    result = torchrun(tmp_path, [option, "train.device=cpu"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("logging_option", [[], ["hydra/job_logging=disabled"]])  # the error is printed still
def test_a_missing_data_file_under_torchrun_is_one_error_and_no_rank_is_left_waiting(tmp_path, logging_option):
    missing = tmp_path / "missing.txt"
    result = torchrun(tmp_path, [*TINY_OVERRIDES, f"data.path={missing}", *logging_option], timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count(f"error: data.path: file {missing} does not exist") == 1
    # rank 1 stopped on its own, not on a lost connection while it waited for rank 0 (Hydra: "Error executing job")
    assert "Error executing job" not in output and "Connection closed" not in output
    assert list(tmp_path.iterdir()) == []


def _main_first_rank(rank: int, init_method: str, failing_rank: int, out: str) -> None:
    """One of two gloo ranks: reads "the data" in `main_first`, where it fails on `failing_rank`; writes what it
    raised to `out`/RANK."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    world = distributed.World(rank=rank, local_rank=rank, world_size=2)
    outcome = "no error"
    try:
        with distributed.main_first(world, torch.device("cpu")):
            if rank == failing_rank:
                raise FluxtrainError(f"data.path: rank {rank} cannot read it")
    except FluxtrainError as e:
        outcome = f"{type(e).__name__} reported={e.reported}: {e}"
    Path(out, str(rank)).write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_main_first_ends_every_rank_when_one_fails_and_only_that_one_prints(tmp_path, failing_rank):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_method = f"tcp://127.0.0.1:{port}"
    torch.multiprocessing.spawn(_main_first_rank, args=(init_method, failing_rank, str(tmp_path)), nprocs=2, join=True)
    outcomes = {rank: (tmp_path / str(rank)).read_text() for rank in (0, 1)}
    other = 1 - failing_rank
    assert outcomes[failing_rank] == f"FluxtrainError reported=True: data.path: rank {failing_rank} cannot read it"
    assert outcomes[other].startswith("ReportedByAnotherRank reported=True: another rank stopped on an error")


def _slow_setup_rank(rank: int, init_method: str, out: str) -> None:
    """One of two gloo ranks whose default group times out after 2 s, while rank 0's setup takes 5 s."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2, timeout=timedelta(seconds=2))
    world = distributed.World(rank=rank, local_rank=rank, world_size=2)
    with distributed.main_first(world, torch.device("cpu")):
        if rank == 0:
            time.sleep(5)
    distributed.barrier()
    Path(out, str(rank)).write_text("set up")
    dist.destroy_process_group()


def test_the_ranks_wait_for_a_setup_longer_than_the_process_group_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_slow_setup_rank, args=(f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(rank)).read_text() for rank in (0, 1)] == ["set up", "set up"]


def test_device_rules_under_torchrun():
    world = distributed.World(rank=1, local_rank=1, world_size=2)
    with pytest.raises(FluxtrainError, match="train.device=mps"):
        distributed.training_device(world, torch.device("mps"))
    with pytest.raises(FluxtrainError, match="cuda:LOCAL_RANK"):
        distributed.training_device(world, torch.device("cuda", 0))
    assert distributed.training_device(world, torch.device("cpu")) == torch.device("cpu")


def test_strategy_is_checked(tiny_cfg, tmp_path):
    with pytest.raises(FluxtrainError, match="train.strategy='zero'"):
        train(tiny_cfg("train.strategy=zero"), tmp_path)
    with pytest.raises(FluxtrainError, match="train.precision=fp16 is not supported with train.strategy=fsdp"):
        train(tiny_cfg("train.strategy=fsdp", "train.precision=fp16"), tmp_path)


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from fluxtrain.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.partition) == (2, "gpu")
    assert launcher.tasks_per_node == launcher.gpus_per_node  # one rank per GPU


@pytest.mark.slow
def test_submitit_launcher_runs_the_tasks_as_one_ddp_job(reference_run, corpus, tmp_path):
    # hydra-submitit-launcher's local executor starts 2 tasks the way SLURM's srun would; they must form one
    # 2-rank job (ranks from submitit's environment) and match the one-process run like torchrun does.
    sweep = tmp_path / "sweep"
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10"]
    overrides = [*RUN_OVERRIDES, f"data.path={corpus}", "train.batch_size=4", *launcher, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "-m", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-12000:]
    run_dir = sweep / "0"
    assert (
        "tokens per optimizer step: 128 (batch 4 x accum 1 x 2 rank(s) x seq 16)" in (run_dir / "train.log").read_text()
    )
    submitted, single = loss_curve(run_dir), loss_curve(reference_run)
    assert max(abs(a - b) for a, b in zip(submitted, single, strict=True)) < 1e-5, (submitted, single)


@pytest.mark.parametrize("flag", ["-m", "--multirun", "hydra.mode=MULTIRUN"])
def test_a_sweep_under_torchrun_is_refused_however_it_is_asked_for(flag, monkeypatch):
    monkeypatch.setattr(distributed, "init_world", lambda: distributed.World(rank=1, local_rank=1, world_size=2))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(FluxtrainError, match="a torchrun job runs one training; sweep with hydra/launcher=slurm"):
        distributed.follow_main_run_dir([flag, "optim.lr=1e-3,3e-3"])


def test_a_peer_that_left_is_told_apart_from_other_errors():
    """A rank waiting in a collective when another stops on its own (printed) error gets gloo's RuntimeError: the
    command then exits quietly on this rank, instead of a second, misleading traceback."""
    from fluxtrain.distributed import peer_left

    gone = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6847")
    assert peer_left(gone) and peer_left(RuntimeError("... Connection reset by peer ..."))
    assert not peer_left(RuntimeError("CUDA out of memory")) and not peer_left(OSError("Connection closed by peer"))
