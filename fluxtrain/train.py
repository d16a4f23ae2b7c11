"""The training loop: build data, model and optimizer from the config, then train, evaluate, sample and save."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fluxtrain import batch_threads, distributed, host, throughput
from fluxtrain.batch_threads import BatchThreads, single_threaded
from fluxtrain.checkpoint import Checkpoint, NonFiniteWeightsError, Progress, restore, rng_state, save_checkpoint
from fluxtrain.compile import compile_model
from fluxtrain.data import TokenData, load_corpus
from fluxtrain.data import validate as validate_data
from fluxtrain.distributed import World
from fluxtrain.errors import FluxtrainError, out_of_memory_as
from fluxtrain.evaluate import bits_per_byte, perplexity
from fluxtrain.files import atomic_write_text
from fluxtrain.hparams import log_hparams
from fluxtrain.init_from import StartWeights, kept_tokenizer, load_start_weights
from fluxtrain.interrupt import GracefulStop, TrainingInterrupted
from fluxtrain.logs import EventWriter, NullWriter, event_writer
from fluxtrain.model import GPT, ModelConfig, eval_mode, flops_per_token
from fluxtrain.model_file import is_sharded, load_state_into, read_model_file, save_model_file
from fluxtrain.optim import build_optimizer, decay_progress, lr_at, set_lr
from fluxtrain.optim import validate as validate_optim
from fluxtrain.precision import PRECISIONS, autocast_context, grad_scaler, warn_without_autocast
from fluxtrain.resume import (
    TOKENIZER_FILE,
    check_tokenizer,
    checkpoint_path,
    checkpoint_run_dir,
    divergence_error,
    find_latest,
    foreign_evaluations,
    load_resume,
    optimizer_changed,
    prune,
    resume_hint,
    set_aside_earlier_run,
    set_aside_later,
    wait_for_a_later_event_file_name,
)
from fluxtrain.run_folder import claim_run_config, lock_run_dir, restore_run_config
from fluxtrain.runs import (
    BEST_MODEL_FILE,
    FINAL_MODEL_FILE,
    ITERATION_KEY,
    METRICS_FILE,
    RUN_OUTPUTS,
    load_metrics,
    model_iter_file,
    results_after,
)
from fluxtrain.sampling import MAX_SEED, check_seed, generate_ids, start_ids
from fluxtrain.time_budget import WarmupCheck, plan_time_budget
from fluxtrain.tokenizer import Tokenizer, load_tokenizer
from fluxtrain.tokenizer import validate as validate_tokenizer

log = logging.getLogger("fluxtrain")

COMPILE_SCOPES = ("model", "blocks")


@dataclass
class TrainConfig:
    max_iters: int = 10000
    # Seconds for the whole run from the start of train() (setup, loop, final eval); ends the loop in time for the
    # final eval and lays the LR schedule over the time instead of max_iters.
    max_time: float | None = None
    batch_size: int = 32  # per device
    grad_accum: int = 1
    log_interval: int = 100
    eval_interval: int = 500
    eval_iters: int = 50
    eval_train: bool = True  # each evaluation also measures eval_iters training batches; false: validation only
    sample_interval: int = 500
    sample_len: int = 200
    ckpt_interval: int = 1000
    keep_last: int = 3
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast; bf16 on CUDA and CPU, fp16 on CUDA only
    compile: bool = False  # torch.compile; falls back to eager with a warning where it fails
    compile_scope: str = "model"  # model: compile it whole | blocks: one compiled block for all (faster to compile)
    # Inductor writes the compiled graph's calling code in C++ instead of Python: less overhead per kernel call, which
    # small models on CPU feel (3% more tokens/s at width 128). null: on for CPU, off on GPUs (not measured there).
    compile_cpp_wrapper: bool | None = None
    strategy: str = "ddp"  # ddp | fsdp (fully_shard), used when launched by torchrun with several processes
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    peak_flops: float | None = None  # peak FLOP/s of one device for MFU; null: GPU table, else a matmul probe
    threads: int = 0  # CPU threads for torch ops; 0 keeps torch's default (one per core)
    # CPU: split each micro-batch into this many parts, each run forward and backward on a thread of its own with
    # single-threaded kernels (fluxtrain/batch_threads.py); faster than intra-op threads for small models. 1: off.
    batch_threads: int = 1
    keep_cpu_memory: bool = True  # glibc malloc keeps freed memory for the next step: no page faults per step


def validate(cfg: TrainConfig) -> None:
    for name in ("max_iters", "batch_size", "grad_accum", "log_interval", "eval_interval", "eval_iters"):
        if getattr(cfg, name) <= 0:
            raise FluxtrainError(f"train.{name}={getattr(cfg, name)} must be a positive integer")
    host.check_threads(cfg.threads, "train.threads", allow_zero=True)
    host.check_threads(cfg.batch_threads, "train.batch_threads", allow_zero=False)
    if cfg.batch_size % cfg.batch_threads:
        raise FluxtrainError(
            f"train.batch_size={cfg.batch_size} does not split into train.batch_threads={cfg.batch_threads} equal parts"
        )
    zero_means = {
        "sample_interval": "no samples",
        "sample_len": "no samples",
        "ckpt_interval": "only at the end",
        "keep_last": "keep all",
    }
    for name, meaning in zero_means.items():
        if getattr(cfg, name) < 0:
            raise FluxtrainError(f"train.{name}={getattr(cfg, name)} must be >= 0 (0 = {meaning})")
    if cfg.max_time is not None and cfg.max_time <= 0:
        raise FluxtrainError(f"train.max_time={cfg.max_time} must be a positive number of seconds")
    if cfg.precision not in PRECISIONS:
        raise FluxtrainError(f"train.precision={cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.compile_scope not in COMPILE_SCOPES:
        raise FluxtrainError(f"train.compile_scope={cfg.compile_scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    distributed.validate_strategy(cfg.strategy, cfg.precision)
    if cfg.peak_flops is not None and cfg.peak_flops <= 0:
        raise FluxtrainError(f"train.peak_flops={cfg.peak_flops} must be a positive number of FLOP/s")
    check_seed(cfg.seed, "train.seed")


def offset_seed(seed: int, offset: int) -> int:
    """`seed + offset` for a generator of its own, wrapped into the seeds fluxtrain takes (0 to 2**32 - 1)."""
    return (seed + offset) % (MAX_SEED + 1)


@torch.no_grad()
def estimate_loss(
    model: nn.Module, data: TokenData, cfg: TrainConfig, device: torch.device, seed: int, world: World | None = None
) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of the validation split, and of the training split unless
    `cfg.eval_train` is false; the same batches at every evaluation.

    Under torchrun each rank evaluates its part of every batch, as in training: N ranks with batch B evaluate the
    windows one process with batch N * B evaluates, and report their mean."""
    world = world or World()
    out = {}
    with eval_mode(model):
        for split in ("train", "val") if cfg.eval_train else ("val",):
            generator = torch.Generator().manual_seed(seed)
            total = 0.0
            for _ in range(cfg.eval_iters):
                x, y = distributed.rank_batch(data, cfg.batch_size, generator, world, split)
                with autocast_context(device, cfg.precision):
                    _, loss = model(x.to(device), y.to(device))
                total += loss.item()
            out[split] = total / cfg.eval_iters
    return dict(zip(out, distributed.means_over_ranks(list(out.values()), device), strict=True))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch to the device; to CUDA through pinned memory, so the copy does not wait for queued work."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def train_step(
    model: torch.nn.Module,
    optimizer,
    scaler: torch.amp.GradScaler,
    data: TokenData,
    batch_gen: torch.Generator,
    world: distributed.World,
    device: torch.device,
    tcfg: TrainConfig,
    grad_clip: float,
    threads: BatchThreads | None = None,
) -> torch.Tensor:
    """One optimizer step over `tcfg.grad_accum` micro-batches of this rank's windows, with autocast, loss scaling
    and gradient clipping; returns the mean loss, still on the device. `model` may be wrapped (DDP, FSDP, compiled).
    With `threads` (train.batch_threads, CPU only) each micro-batch is split over them."""
    loss_sum = None
    params = [p for p in model.parameters() if p.requires_grad] if threads else []
    autocast = functools.partial(autocast_context, device, tcfg.precision)
    for micro in range(tcfg.grad_accum):
        x, y = distributed.rank_batch(data, tcfg.batch_size, batch_gen, world)
        if threads:
            loss = threads.forward_backward(model, params, x, y, 1 / tcfg.grad_accum, autocast)
        else:
            with distributed.grad_sync(model, micro == tcfg.grad_accum - 1):
                with autocast():
                    _, loss = model(to_device(x, device), to_device(y, device))
                scaler.scale(loss / tcfg.grad_accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()  # no kernel for one micro-batch
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / tcfg.grad_accum


def sample_text(model: GPT, tokenizer: Tokenizer, length: int, seed: int) -> str:
    prompt = start_ids(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    # A model sharded by fully_shard gathers its weights in each module call, which the cached decoding step skips.
    use_cache = not is_sharded(model)
    # Eager, past blocks compiled in place (train.compile_scope=blocks): each cache length and layer index would
    # otherwise be a recompilation of the training graph's function.
    with torch.compiler.set_stance("force_eager"):
        ids = generate_ids(model, prompt, length, temperature=1.0, top_k=40, generator=generator, use_cache=use_cache)
    return tokenizer.decode(ids)


def claim_run_dir(
    run_dir: Path, tokenizer: Tokenizer, resume: Checkpoint | None, tokenizer_path: str | None = None
) -> None:
    """Set aside what this run replaces in `run_dir` (what was written after the resume point and the results the
    resumed run writes again, or an earlier run's files when the run starts afresh or continues another run's
    checkpoint) and save the tokenizer; call it once nothing can fail a setting check.
    The tokenizer file the run was given (`tokenizer_path`) is never moved or rewritten, in the folder or not."""
    claim_run_config(run_dir)  # the Hydra config files saved for this run stay
    given = (Path(tokenizer_path).expanduser(),) if tokenizer_path else ()
    if resume and checkpoint_run_dir(resume.path) == run_dir.resolve():
        at = resume.progress.iteration
        set_aside_later(run_dir, at, results_after(run_dir, at, resume.path))
    else:
        set_aside_earlier_run(run_dir, RUN_OUTPUTS, resume.path if resume else None, inputs=given)
    if (run_dir / TOKENIZER_FILE).resolve() not in {p.resolve() for p in given}:
        tokenizer.save(run_dir / TOKENIZER_FILE)
    if resume:  # a fresh run moved the earlier run's event files away
        wait_for_a_later_event_file_name(run_dir)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train the model described by `cfg`, writing TensorBoard events, checkpoints, model files and metrics.json into
    `run_dir` (its log lines go to the `fluxtrain` logger; the command line also writes them to `train.log` there).

    SIGINT/SIGTERM stop the run after the current iteration with a checkpoint (raising TrainingInterrupted).
    """
    with GracefulStop() as stop, contextlib.ExitStack() as resources:
        return run_training(cfg, Path(run_dir), stop, resources)


def check_settings(cfg: DictConfig) -> ModelConfig:
    """Every setting check that needs no data or device, each a one-line error before any work (a BPE tokenizer may
    be trained, a checkpoint read, before the first one that does); returns the model's config."""
    from fluxtrain.config import check_config  # config.py imports this module, for TrainConfig

    check_config(cfg)
    validate(cfg.train)
    model_cfg = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg.validate()
    validate_optim(cfg.optim)
    validate_data(cfg.data)
    validate_tokenizer(cfg.tokenizer)
    return model_cfg


def build_model(model_cfg: ModelConfig, vocab_size: int, device: torch.device, start: StartWeights | None) -> GPT:
    """The model to train on `device`: random weights from the seed set before, or `init_from`'s (`start`)."""
    smaller = "; use a smaller one: lower model.d_model, model.ff_dim or model.n_layers"  # no batch setting helps
    with out_of_memory_as("out of memory building the model", smaller):
        model = GPT(model_cfg, vocab_size).to(device)
    if start:
        load_state_into(model, start.state, str(start.path))
    return model


def wrap_for_training(model: GPT, data: TokenData, world: World, device: torch.device, tcfg: TrainConfig) -> nn.Module:
    """The module the loop calls: `model` in DDP or sharded by FSDP under torchrun, compiled with train.compile."""
    train_model = distributed.wrap_model(model, world, tcfg.strategy)
    if not tcfg.compile:
        return train_model
    x, y = distributed.rank_batch(data, tcfg.batch_size, torch.Generator().manual_seed(tcfg.seed), world)
    part = tcfg.batch_size // tcfg.batch_threads  # with batch threads: compiled for a part, single-threaded
    with single_threaded() if tcfg.batch_threads > 1 else contextlib.nullcontext():
        return compile_model(
            train_model,
            model.blocks,
            x[:part].to(device),
            y[:part].to(device),
            lambda: autocast_context(device, tcfg.precision),
            tcfg.compile_scope,
            device.type == "cpu" if tcfg.compile_cpp_wrapper is None else tcfg.compile_cpp_wrapper,
            tcfg.activation_checkpointing,
        )


def budget_raised(tcfg: TrainConfig, resume: Checkpoint) -> bool:
    """Whether `train.max_time` is larger than the one the checkpoint's run had."""
    before = resume.config.get("train", {}).get("max_time")
    return isinstance(before, (int, float)) and tcfg.max_time is not None and tcfg.max_time > before


def finished_results(run_dir: Path, resume: Checkpoint | None) -> dict[str, Any] | None:
    """The results of a run that ended at `resume`, the newest checkpoint in its folder, from its metrics.json; None
    when the run has not ended there, or went on past it. A finished run resumed again (a requeued job, a sweep run
    again with resume=auto) has nothing left to do. Rank 0 reads the file and tells the others."""
    results = None
    latest = find_latest(run_dir) if resume is not None else None
    newest = latest is not None and latest.resolve() == resume.path.resolve()
    if newest and distributed.current_world().is_main and checkpoint_run_dir(resume.path) == run_dir.resolve():
        try:
            metrics = load_metrics(run_dir / METRICS_FILE)
        except (OSError, ValueError):  # none, or damaged: evaluate again and write it anew
            metrics = None
        if metrics is not None and metrics.get("iters") == resume.progress.iteration:
            results = metrics if intact_results(run_dir) else None
    return distributed.main_rank_object(results)


def warn_nothing_to_train(tcfg: TrainConfig, progress: Progress, loop_time: float | None, evaluated: bool) -> None:
    """A resumed run whose checkpoint leaves nothing to train: which budget ended it, and that the final evaluation
    runs, unless the checkpoint holds the one at its iteration already (`evaluated`)."""
    it = progress.iteration
    then = "its evaluation there stands, with nothing to train" if evaluated else "evaluating without training"
    if it >= tcfg.max_iters:
        log.warning(
            f"the checkpoint is at iteration {it}, which reaches train.max_iters={tcfg.max_iters}: {then} "
            "(raise train.max_iters to train on)"
        )
    elif loop_time is not None and progress.train_time >= loop_time:
        log.warning(
            f"the checkpoint's {progress.train_time:.1f}s of training use up the {loop_time:.1f}s that "
            f"train.max_time={tcfg.max_time:g} leaves to train: {then} (raise train.max_time to train on)"
        )


def intact_results(run_dir: Path) -> bool:
    """Whether the final model file and the tokenizer a finished run wrote load; where one does not, it is said, and
    the run evaluates and writes them again as for a damaged metrics.json."""
    try:
        read_model_file(run_dir / FINAL_MODEL_FILE)
        load_tokenizer(run_dir / TOKENIZER_FILE)
    except FluxtrainError as e:
        log.warning(f"the finished run's results do not stand ({e}): evaluating again and writing them anew")
        return False
    return True


def run_training(
    cfg: DictConfig, run_dir: Path, stop: GracefulStop, resources: contextlib.ExitStack
) -> dict[str, float]:
    """`train`'s body; what must be closed at its end (the batch threads, the TensorBoard writer) goes on
    `resources`."""
    tcfg: TrainConfig = cfg.train
    if cfg.get("task", "train") != "train":  # from Python: the command line runs the chosen task
        raise FluxtrainError(
            f"task={cfg.task}: train() trains; fluxtrain.lr_find.lr_find(cfg, run_dir) runs task=lr_find"
        )
    model_cfg = check_settings(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    world = distributed.current_world()
    if cfg.optim.warmup_iters >= tcfg.max_iters:
        log.warning(
            f"optim.warmup_iters={cfg.optim.warmup_iters} >= train.max_iters={tcfg.max_iters}: "
            f"the learning rate stays below optim.lr={cfg.optim.lr} for the whole run"
        )
    elif (
        cfg.optim.warmup_iters == tcfg.max_iters - 1 > 0 and tcfg.max_time is None and cfg.optim.min_lr != cfg.optim.lr
    ):
        log.warning(
            f"optim.warmup_iters={cfg.optim.warmup_iters} leaves one iteration of train.max_iters={tcfg.max_iters} "
            f"after the warm-up: it runs at optim.lr={cfg.optim.lr}, and the schedule never decays to optim.min_lr"
        )
    distributed.check_sharded_optimizer(world, tcfg.strategy, cfg.optim.name)  # before the data is read
    device = distributed.training_device(world, host.resolve_device(tcfg.device))
    batch_threads.check(tcfg.batch_threads, device, world.is_distributed, model_cfg.dropout)
    warn_without_autocast(device, tcfg.precision)
    # torch.optim imports torch._dynamo when it builds its first optimizer (about 1 s): done before the clock starts,
    # so that the first run of a process (a sweep's job 0) is not charged for it in its wall time.
    importlib.import_module("torch._dynamo")
    t_start = time.perf_counter()

    resume = load_resume(cfg, run_dir)
    resources.callback(torch.set_num_threads, torch.get_num_threads())  # a caller's own threads, after the run
    host.configure(tcfg.threads, tcfg.keep_cpu_memory)
    threads = resources.enter_context(BatchThreads(tcfg.batch_threads)) if tcfg.batch_threads > 1 else None
    torch.manual_seed(tcfg.seed)
    with distributed.main_first(world, device):  # rank 0 downloads, trains the tokenizer and fills the cache
        if world.is_main and (lock := lock_run_dir(run_dir)) is not None:  # rank 0 speaks for the run's ranks
            resources.callback(os.close, lock)
        start = load_start_weights(cfg, model_cfg, resuming=resume is not None)
        given = kept_tokenizer(cfg, start, resume)
        data, tokenizer, source = load_corpus(cfg.data, cfg.tokenizer, model_cfg.seq_len, run_dir, given)
    if resume:
        check_tokenizer(resume, tokenizer)
    log.info(
        f"data: {source} | {len(data.train):,} train / {len(data.val):,} val tokens "
        f"| {tokenizer.name} tokenizer, vocab {tokenizer.vocab_size}"
    )

    model = build_model(model_cfg, tokenizer.vocab_size, device, start)
    model.activation_checkpointing = tcfg.activation_checkpointing
    n_params = model.num_params()
    log.info(f"model: {n_params:,} parameters ({model_cfg.n_layers} layers, width {model_cfg.d_model})")
    train_model = wrap_for_training(model, data, world, device, tcfg)
    optimizer = build_optimizer(model, cfg.optim)  # after wrapping: FSDP replaces the parameters by shards
    scaler = grad_scaler(device, tcfg.precision)

    tokens_per_iter = tcfg.batch_size * tcfg.grad_accum * world.world_size * model_cfg.seq_len
    # On CPU the peak of the cores training uses: batch threads run single-threaded kernels, one core each
    cores = tcfg.batch_threads if tcfg.batch_threads > 1 else torch.get_num_threads()
    peak, peak_source = throughput.peak_flops(device, tcfg.peak_flops, tcfg.precision, cores)
    if warning := throughput.slow_bf16_warning(device, tcfg.precision):
        log.warning(warning)
    model_flops = flops_per_token(model_cfg, n_params)
    log.info(
        f"tokens per optimizer step: {tokens_per_iter:,} (batch {tcfg.batch_size} x accum {tcfg.grad_accum} "
        f"x {world.world_size} rank(s) x seq {model_cfg.seq_len}) | device {device} | "
        f"peak {throughput.format_flops(peak)} per device ({peak_source})"
    )
    batch_gen = torch.Generator().manual_seed(tcfg.seed)  # the same on every rank: each takes its part of a batch
    if world.rank > 0:  # its own dropout masks (the model was built alike on every rank, from train.seed)
        torch.manual_seed(offset_seed(tcfg.seed, world.rank << 20))
    progress = Progress()
    if resume:
        try:
            progress = restore(resume, model, optimizer, scaler, batch_gen)
        except FluxtrainError as e:
            raise optimizer_changed(e, resume, cfg.optim.name) from None

    foreign = foreign_evaluations(resume, cfg, run_dir) if resume else None
    if foreign:
        if progress.eval_at is not None:
            log.info(
                f"the checkpoint's evaluations (best val loss {progress.best_val_loss:.4f}) are not carried over: "
                f"{foreign}; this run keeps its own best"
            )
        progress = replace(progress, best_val_loss=math.inf, eval_at=None, eval_val_loss=None, eval_train_loss=None)
    best_val = progress.best_val_loss
    last_losses, evaluated_at = progress.last_evaluation(), progress.eval_at  # evaluated_at: last_losses' iteration
    it = progress.iteration
    warmup_done_at: float | None = progress.warmup_done_at
    # seconds the loop may take: the budget less the setup so far and the final eval; the loop's clock starts now
    budget = plan_time_budget(tcfg, t_start, model, data, device, progress, resume)
    loop_time = budget.loop_time if budget else None
    if loop_time is not None and resume and progress.time_ran_out and not budget_raised(tcfg, resume):
        # Spent, whatever this session's setup took: a shorter one (a warm cache) must not find time to train on.
        loop_time = min(loop_time, progress.train_time)
    t_loop = time.perf_counter() - progress.train_time
    no_steps_left = it >= tcfg.max_iters or (loop_time is not None and progress.train_time >= loop_time)
    if no_steps_left and not foreign and (results := finished_results(run_dir, resume)) is not None:
        time_spent = loop_time is not None and progress.train_time >= loop_time
        ended = {"train.max_iters": it >= tcfg.max_iters, "train.max_time": time_spent}
        more = " and ".join(name for name, out in ended.items() if out)  # what to raise: what ended the run
        log.warning(
            f"the run finished at iteration {it}, the checkpoint's: its results in {run_dir / METRICS_FILE} stand, "
            f"with nothing to train or evaluate (raise {more} to train on)"
        )
        restore_run_config(run_dir)  # the folder is left as it was, the run's own settings included
        return results
    if no_steps_left:
        warn_nothing_to_train(tcfg, progress, loop_time, evaluated=evaluated_at == it)
    # Every check has passed: only now does the run move or write files in its folder.
    writer: EventWriter | NullWriter = NullWriter()  # rank 0 speaks for the run's ranks
    if world.is_main:
        claim_run_dir(run_dir, tokenizer, resume, cfg.tokenizer.path)
        # On resume, TensorBoard hides the events a dead run logged after the checkpoint, so no step appears twice.
        purge_step = resume.progress.iteration + 1 if resume else None
        writer = resources.enter_context(event_writer(run_dir, purge_step=purge_step))
    t_window, steps_window, losses_window = time.perf_counter(), 0, list(progress.window_losses)
    lr = cfg.optim.lr  # the last step's learning rate, as the loop sets it
    time_ran_out = False  # the loop ended on train.max_time before train.max_iters
    tokens_per_sec: float | None = None  # of the last logged window; None when this session logged none
    mfu_warned = False  # an MFU above 100% says the peak is wrong: told once
    last_ckpt = resume.path if resume else None
    show_bar = sys.stderr.isatty() and world.is_main  # tqdm draws on stderr
    if show_bar and sys.stdout.isatty():  # log lines go above the bar on the same screen, not onto its line's end
        resources.enter_context(logging_redirect_tqdm())
    # With a time budget the iterations the run will reach are unknown: the bar counts them, with no total or ETA.
    bar_total = tcfg.max_iters if loop_time is None else None
    bar = tqdm(total=bar_total, initial=it, disable=not show_bar, desc="train", leave=False)

    pending: list[torch.Tensor] = []  # the losses of the steps since the last collect_losses(), still on the device

    def collect_losses() -> None:
        """Bring the pending losses to the host in one transfer and stop on the first NaN or infinite one.

        On CUDA this runs only before logging, evaluating, sampling and saving, so the host does not wait for
        the device after every step; elsewhere it runs after every step.
        """
        if not pending:
            return
        values = torch.stack(pending).tolist()
        first = it - len(values) + 1
        pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise divergence_error(f"loss became {value}", first + i, last_ckpt, cfg.optim.lr)
        losses_window.extend(values)

    def evaluate_and_save_best(step: int) -> None:
        nonlocal best_val, last_losses, evaluated_at, loop_time
        collect_losses()
        t_eval = time.perf_counter()
        last_losses, evaluated_at = estimate_loss(model, data, tcfg, device, offset_seed(tcfg.seed, 1), world), step
        eval_time = time.perf_counter() - t_eval
        if budget is not None and loop_time is not None:  # every rank keeps rank 0's figure
            loop_time -= budget.keep_for_final_eval(distributed.main_rank_value(eval_time, device))
        for split, value in last_losses.items():  # weights can be finite yet overflow: nothing is saved after it
            if not math.isfinite(value):
                raise divergence_error(f"the {split} loss became {value} when evaluated", step, last_ckpt, cfg.optim.lr)
        val_ppl = perplexity(last_losses["val"])
        val_bpb = bits_per_byte(last_losses["val"], data.bytes_per_token)
        writer.add_scalar("val/loss", last_losses["val"], step)
        writer.add_scalar("val/perplexity", val_ppl, step)
        writer.add_scalar("val/bpb", val_bpb, step)
        train_part = ""
        if "train" in last_losses:
            writer.add_scalar("train/eval_loss", last_losses["train"], step)
            train_part = f" | train {last_losses['train']:.4f}"
        log.info(
            f"eval {step:>6}{train_part} | val {last_losses['val']:.4f} "
            f"| val ppl {val_ppl:.2f} | val bpb {val_bpb:.4f} | {eval_time:.1f}s"
        )
        if last_losses["val"] < best_val:
            best_val = last_losses["val"]
            save_model_file(run_dir / BEST_MODEL_FILE, model, tokenizer, {ITERATION_KEY: str(step)})

    dead_writes_left = True  # an earlier session's, until this one's first checkpoint removes them

    def write_checkpoint() -> None:
        nonlocal last_ckpt, dead_writes_left
        collect_losses()
        writer.flush()  # the events up to `it` reach the disk before the checkpoint that resumes after them
        # The window's losses averaged over the ranks, as the log line counts them, so that a resume on any number
        # of ranks logs what the run would have logged (a collective: every rank writes the checkpoint).
        window = distributed.means_over_ranks(losses_window, device)
        wall_time = progress.wall_time + time.perf_counter() - t_start
        state = Progress(
            iteration=it,
            best_val_loss=best_val,
            train_time=time.perf_counter() - t_loop,
            warmup_done_at=warmup_done_at,
            window_losses=window,
            wall_time=wall_time,
            eval_at=evaluated_at,
            eval_val_loss=last_losses.get("val"),
            eval_train_loss=last_losses.get("train"),
            time_ran_out=time_ran_out,
        )
        path = checkpoint_path(run_dir, it)
        config = OmegaConf.to_container(cfg, resolve=True)
        if resume and config.get("init_from") is None:  # a run that continues a fine-tuning run stays one
            config["init_from"] = resume.config.get("init_from")
        try:
            save_checkpoint(path, model, optimizer, scaler, rng_state(batch_gen, device), tokenizer, config, state)
        except NonFiniteWeightsError:
            raise divergence_error("the weights became NaN or infinite", it, last_ckpt, cfg.optim.lr) from None
        last_ckpt = path
        if world.is_main:
            prune(run_dir, tcfg.keep_last, RUN_OUTPUTS, dead_writes=dead_writes_left)
        dead_writes_left = False

    def log_window() -> None:
        """Log the training steps since the last log line: their mean loss, the learning rate and the throughput."""
        nonlocal t_window, steps_window, losses_window, tokens_per_sec, mfu_warned
        collect_losses()
        dt = time.perf_counter() - t_window
        tokens_per_sec = steps_window * tokens_per_iter / dt
        train_loss = distributed.mean_over_ranks(sum(losses_window) / len(losses_window), device)
        mfu = throughput.mfu(tokens_per_sec, model_flops, peak, world.world_size)
        if not mfu_warned and (warning := throughput.impossible_mfu_warning(mfu, peak_source)):
            log.warning(warning)
            mfu_warned = True
        # With a time budget: the seconds trained of those the loop has, not train.max_iters (the recipes' 100000)
        done = f"/{tcfg.max_iters}" if loop_time is None else f" | {time.perf_counter() - t_loop:.0f}/{loop_time:.0f}s"
        log.info(
            f"iter {it:>6}{done} | loss {train_loss:.4f} | lr {lr:.2e} "
            f"| {steps_window / dt:.1f} it/s | {tokens_per_sec:,.0f} tok/s | MFU {100 * mfu:.1f}%"
        )
        writer.add_scalar("train/loss", train_loss, it)
        writer.add_scalar("lr", lr, it)
        writer.add_scalar("throughput/tokens_per_sec", tokens_per_sec, it)
        writer.add_scalar("throughput/mfu", mfu, it)
        t_window, steps_window, losses_window = time.perf_counter(), 0, []

    stop.install()
    warmup_check, first_it = WarmupCheck(cfg.optim, tcfg, it), it
    while True:
        elapsed = time.perf_counter() - t_loop
        if loop_time is not None and world.is_distributed:  # all ranks stop at one step, with one lr schedule
            elapsed = distributed.main_rank_value(elapsed, device)
        if loop_time is not None:
            warmup_check.before_step(it, elapsed, loop_time - elapsed)
        # Out of time: a session with time left at setup still takes its first step, which the folder's setup after
        # the plan may have used up the last of.
        out_of_time = loop_time is not None and elapsed >= loop_time and (it > first_it or no_steps_left)
        if it >= tcfg.max_iters or out_of_time:
            time_ran_out = out_of_time and it < tcfg.max_iters
            break
        # Learning rate: warm-up in iterations, then optim.schedule over the rest of the budget. With a time budget
        # too, the schedule follows whichever budget is further spent, so it ends where the run does.
        schedule_progress = decay_progress(it, cfg.optim.warmup_iters, tcfg.max_iters)
        if loop_time is not None:
            if warmup_done_at is None and it >= cfg.optim.warmup_iters:
                warmup_done_at = elapsed
            start = warmup_done_at or 0.0
            schedule_progress = max(schedule_progress, (elapsed - start) / max(loop_time - start, 1e-9))
        lr = lr_at(it, schedule_progress, cfg.optim)
        set_lr(optimizer, lr)

        loss = train_step(
            train_model, optimizer, scaler, data, batch_gen, world, device, tcfg, cfg.optim.grad_clip, threads
        )
        it += 1
        bar.update(1)
        steps_window += 1
        pending.append(loss)
        if device.type != "cuda":
            collect_losses()

        if it % tcfg.log_interval == 0 or it == tcfg.max_iters:
            log_window()
        t_side = time.perf_counter()  # time spent outside training steps is left out of the throughput
        if it % tcfg.eval_interval == 0:
            evaluate_and_save_best(it)
        if tcfg.sample_interval and tcfg.sample_len and it % tcfg.sample_interval == 0:
            collect_losses()
            text = sample_text(model, tokenizer, tcfg.sample_len, offset_seed(tcfg.seed, it))
            log.info(f"sample at iteration {it}:\n{text}")
            writer.add_text("sample", text, it)
        if tcfg.ckpt_interval and it % tcfg.ckpt_interval == 0:
            write_checkpoint()  # first: it refuses NaN or infinite weights
            save_model_file(run_dir / model_iter_file(it), model, tokenizer, {ITERATION_KEY: str(it)})
        if distributed.any_rank(stop.requested, device):  # every rank stops after the same iteration
            if last_ckpt != checkpoint_path(run_dir, it):
                write_checkpoint()
            distributed.barrier()  # no rank names the checkpoint before rank 0 has written it
            by = stop.stopped_by
            log.warning(f"stopped by {by} after iteration {it}; checkpoint: {last_ckpt}")
            command = resume_hint(run_dir, world.world_size, distributed.local_world_size(world))
            log.warning(f"resume with: {command}")
            signum = stop.signum or signal.SIGTERM  # the signal may have reached another rank only
            raise TrainingInterrupted(f"stopped by {by}; checkpoint {last_ckpt}", signum)
        t_window += time.perf_counter() - t_side
    if steps_window:  # the steps since the last log line, when train.max_time ended the loop between two
        log_window()
    bar.close()
    stop.finishing = True

    if evaluated_at != it:  # a run resumed at its end was evaluated there, and logged it, before its checkpoint
        evaluate_and_save_best(it)
    if last_ckpt != checkpoint_path(run_dir, it) or time_ran_out:  # one written in the loop does not say it ran out
        write_checkpoint()
    save_model_file(run_dir / FINAL_MODEL_FILE, model, tokenizer, {ITERATION_KEY: str(it)})
    wall_time = progress.wall_time + time.perf_counter() - t_start  # of every session, for a resumed run
    metrics = {
        "iters": it,
        "final_train_loss": last_losses.get("train"),  # None with train.eval_train=false
        "final_val_loss": last_losses["val"],
        "best_val_loss": best_val,
        "val_perplexity": perplexity(last_losses["val"]),
        "val_bpb": bits_per_byte(last_losses["val"], data.bytes_per_token),
        "best_val_bpb": bits_per_byte(best_val, data.bytes_per_token),  # what runs of other tokenizers compare on
        "tokens_per_sec": tokens_per_sec,
        "wall_time_sec": wall_time,
        "n_params": n_params,
        "vocab_size": tokenizer.vocab_size,  # as trained: a BPE vocabulary may be smaller than tokenizer.vocab_size
    }
    if world.is_main:
        atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        prune(run_dir, tcfg.keep_last, RUN_OUTPUTS)  # also what a killed session left half-written: its last chance
        log_hparams(writer, cfg, metrics)
    writer.close()
    log.info(f"done: {it} iterations in {wall_time:.1f}s | val loss {metrics['final_val_loss']:.4f} | {run_dir}")
    if distributed.any_rank(stop.requested, device):  # a signal during the final evaluation or writes: obeyed now
        by = stop.stopped_by
        log.warning(f"stopped by {by} as the run finished; its results are written")
        raise TrainingInterrupted(f"stopped by {by} as the run finished", stop.signum or signal.SIGTERM)
    return metrics
