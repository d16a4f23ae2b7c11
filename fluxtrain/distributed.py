"""Data-parallel training on torch.distributed: the process group from torchrun (or SLURM), DDP/FSDP, shared batches."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from fluxtrain.errors import FluxtrainError, paths_named
from fluxtrain.logs import report_error
from fluxtrain.overrides import hydra_override, is_multirun, runs_nothing

log = logging.getLogger("fluxtrain")

STRATEGIES = ("ddp", "fsdp")
# Test-only fault injection: "RANK:ITER" makes that rank raise in its ITER-th training forward (1-based).
FAULT_ENV = "FLUXTRAIN_TEST_FAULT"
# How long the other ranks wait for rank 0 to download the data, train the tokenizer and fill the cache.
SETUP_TIMEOUT = datetime.timedelta(days=1)
_run_dir_pending = False  # rank 0 of torchrun still owes the other ranks its run folder


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `world_size` processes and its rank on this node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def current_world() -> World:
    """The world of the initialized process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return World(dist.get_rank(), local_rank, dist.get_world_size())


def _export_slurm_env() -> None:
    """In a job of several tasks started by the submitit launcher (SLURM, or local), set torchrun's variables."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return
    import submitit
    import submitit.helpers

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(overwrite=False)


def init_world() -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), once.

    The group gets gloo for CPU tensors and, where CUDA is there, NCCL for CUDA tensors; without those variables
    this is one process and nothing is initialized.
    """
    if dist.is_available() and dist.is_initialized():
        return current_world()
    _export_slurm_env()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # before any NCCL call, so each rank talks from its own GPU
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return current_world()


def leave_world_after_error() -> None:
    """Leave the gloo process group as a rank stops on an error, without waiting for the others: a process that
    exits in it sometimes aborts in gloo's threads (SIGABRT), and torchrun then blames that rank. (NCCL groups are
    left to the exit: tearing one down while other ranks may still run a collective can hang.)"""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        try:
            dist.destroy_process_group()
        except Exception:  # leaving is best effort: the process ends anyway
            pass


def close_world() -> None:
    """Leave the process group once every rank is done (called after a run that ended normally on every rank), so
    no rank tears down its connections while another still finishes its last writes."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def follow_main_run_dir(argv: list[str]) -> list[str]:
    """Before Hydra starts: ranks > 0 of a torchrun job wait for rank 0's run folder and add it to their overrides.

    Hydra's `${now:...}` is read separately in every process, so each rank would otherwise pick its own folder.
    Rank 0 runs Hydra as usual and hands the folder it chose to `publish_run_dir`; the other ranks run Hydra with
    `hydra.run.dir` set to it and without writing the `.hydra/` copy of the config.
    """
    global _run_dir_pending
    world = init_world()
    if not world.is_distributed or "RANK" not in os.environ or "SUBMITIT_EXECUTOR" in os.environ:
        return argv
    if is_multirun(argv):
        raise FluxtrainError("a torchrun job runs one training; sweep with hydra/launcher=slurm instead of -m")
    if runs_nothing(argv):
        return argv
    if world.is_main:
        _run_dir_pending = True
        return argv
    received = [None]
    dist.broadcast_object_list(received, src=0)
    return [*argv, hydra_override("hydra.run.dir", str(received[0])), "hydra.output_subdir=null"]


def publish_run_dir(run_dir: str) -> None:
    """Rank 0's half of `follow_main_run_dir`: send the run folder Hydra chose to the other ranks."""
    global _run_dir_pending
    if _run_dir_pending:
        dist.broadcast_object_list([str(run_dir)], src=0)
        _run_dir_pending = False


def quiet_other_ranks(world: World) -> None:
    """Only rank 0 logs: other ranks drop log files and report errors only."""
    if world.is_main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    logging.getLogger("fluxtrain").setLevel(logging.ERROR)


class ReportedByAnotherRank(FluxtrainError):
    """This rank stops on an error that another rank printed."""

    reported = True


@contextlib.contextmanager
def main_first(world: World, device: torch.device) -> Iterator[None]:
    """Rank 0 runs the block first, then one rank per other node, then the rest.

    For downloads, tokenizer training and token caches: the later ranks find the files the first ones wrote
    (on a shared or a node-local disk) instead of writing the same files at the same time.

    When the block fails on a rank (a missing data file), that rank prints its error and then tells the others,
    which stop with `ReportedByAnotherRank`: one error, and no rank left waiting for one that has gone.
    """
    if not world.is_distributed:
        yield
        return
    # The waiting ranks wait in a group of their own, on CPU: the default group's timeout (30 minutes for gloo, less
    # for NCCL) would end them while rank 0 trains a tokenizer on a large corpus.
    waiting = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    stage = 0 if world.is_main else 1 if world.local_rank == 0 else 2
    error: FluxtrainError | None = None
    for turn in range(3):
        if turn == stage:
            try:
                with paths_named():  # a path that no check named (a name too long) is such an error too
                    yield
            except FluxtrainError as e:
                report_error(f"error: {e}")  # now: torchrun may end this process once the others have stopped
                e.reported, error = True, e
        if any_rank(error is not None, torch.device("cpu"), waiting):
            if error is not None:
                raise error
            raise ReportedByAnotherRank("another rank stopped on an error while reading the data, and printed it")
    dist.destroy_process_group(waiting)


def training_device(world: World, device: torch.device) -> torch.device:
    """The device of this rank: CUDA ranks take the GPU numbered by their local rank."""
    if not world.is_distributed:
        return device
    if device.type == "mps":
        raise FluxtrainError("train.device=mps trains in one process; run torchrun with train.device=cuda or cpu")
    if device.type == "cuda":
        if device.index is not None:
            raise FluxtrainError(
                f"train.device={device} names one GPU, but each torchrun rank takes cuda:LOCAL_RANK; "
                "set train.device=cuda or auto"
            )
        if world.local_rank >= torch.cuda.device_count():
            raise FluxtrainError(
                f"rank {world.rank} has local rank {world.local_rank} but this node has "
                f"{torch.cuda.device_count()} CUDA device(s); lower --nproc_per_node"
            )
        return torch.device("cuda", world.local_rank)
    return device


def validate_strategy(strategy: str, precision: str) -> None:
    if strategy not in STRATEGIES:
        raise FluxtrainError(f"train.strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and precision == "fp16":
        raise FluxtrainError("train.precision=fp16 is not supported with train.strategy=fsdp; use bf16")


def check_sharded_optimizer(world: World, strategy: str, optimizer_name: str) -> None:
    """Muon orthogonalizes whole matrices, and under FSDP each rank holds only a shard of them."""
    if world.is_distributed and strategy == "fsdp" and optimizer_name == "muon":
        raise FluxtrainError("optim.name=muon is not supported with train.strategy=fsdp; use ddp or adamw")


def wrap_model(model: nn.Module, world: World, strategy: str) -> nn.Module:
    """The model to train: as is in one process, in DistributedDataParallel, or sharded in place by `fully_shard`.

    With FSDP the returned module is `model` itself (its parameters become shards), so build the optimizer after
    this call; with DDP the optimizer may hold `model`'s parameters, which DDP shares.
    """
    _install_fault_injection(model, world)
    if not world.is_distributed:
        if strategy == "fsdp":
            log.info("train.strategy=fsdp: one process, so the model is not sharded")
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Around forward and backward: gradients are all-reduced (last micro-step) or kept local (earlier ones)."""
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    if enabled:
        yield
    elif isinstance(inner, nn.parallel.DistributedDataParallel):
        with inner.no_sync():
            yield
    elif hasattr(inner, "set_requires_gradient_sync"):  # sharded by fully_shard
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        yield


def rank_batch(
    data, batch_size: int, generator: torch.Generator, world: World, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of one global micro-batch of `split`.

    Every rank holds the same generator and draws all `world_size * batch_size` windows; rank r keeps windows
    [r * batch_size, (r + 1) * batch_size). So the ranks see different windows, and N ranks with batch B see
    exactly the windows that one process with batch N * B sees.
    """
    x, y = data.get_batch(split, batch_size * world.world_size, generator)
    mine = slice(world.rank * batch_size, (world.rank + 1) * batch_size)
    return x[mine], y[mine]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with FSDP's sharded state tensors gathered whole (a collective: all ranks call it)."""
    state = optimizer.state_dict()
    # New per-parameter dicts: state_dict() hands out the optimizer's live ones, which must keep their shards.
    state["state"] = {
        index: {name: value.full_tensor() if hasattr(value, "full_tensor") else value for name, value in ps.items()}
        for index, ps in state["state"].items()
    }
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole-tensor optimizer state_dict cut into the shards of the optimizer's FSDP parameters (if sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param_state in state["state"].items():
        param = params[int(index)]
        if not isinstance(param, DTensor):
            continue
        for name, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                value = value.to(param.device, param.dtype)
                param_state[name] = distribute_tensor(value, param.device_mesh, param.placements)
    return state


def load_full_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole weights into a model sharded by `fully_shard`; every rank passes the same weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_world_size(world: World) -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, else the whole world."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))


def peer_left(e: BaseException) -> bool:
    """Whether `e` is gloo telling this rank that another one closed its connections: a rank that stopped on an error
    of its own, which it printed, while this one waited for it in a collective."""
    return isinstance(e, RuntimeError) and any(
        phrase in str(e) for phrase in ("Connection closed by peer", "Connection reset by peer")
    )


def any_rank(flag: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """Whether `flag` is true on at least one rank (the flag itself in one process); in `group`, else the default
    group."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def main_rank_value(value: float, device: torch.device) -> float:
    """Rank 0's value of a number on every rank (the number itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def main_rank_object(obj: Any) -> Any:
    """Rank 0's picklable object on every rank (the object itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    received = [obj]
    dist.broadcast_object_list(received, src=0)
    return received[0]


def gather_from_ranks(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's CPU tensor of one shape (a generator's state), in rank order; [t] in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [t]
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return gathered


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a number over all ranks (the number itself in one process)."""
    return means_over_ranks([value], device)[0]


def means_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each number's mean over all ranks (the numbers themselves in one process); every rank passes as many."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def _install_fault_injection(model: nn.Module, world: World) -> None:
    """Test only: with FLUXTRAIN_TEST_FAULT=RANK:ITER, rank RANK raises in its ITER-th training forward."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, at = (int(part) for part in spec.split(":"))
    if rank != world.rank:
        return
    calls = [0]

    def hook(module: nn.Module, args) -> None:
        if module.training:
            calls[0] += 1
            if calls[0] == at:
                print(f"{FAULT_ENV}: rank {world.rank} fails at training forward {at}", file=sys.stderr, flush=True)
                raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {world.rank}")

    model.register_forward_pre_hook(hook)
