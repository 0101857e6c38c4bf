"""The processes of a distributed stage: which one this is, where it computes, and the collective steps the
stages share.

The launcher (``latent_sft_core.launcher``) starts a distributed stage under torchrun or deepspeed, which put
RANK, WORLD_SIZE and LOCAL_RANK in each process's environment; a stage started alone is rank 0 of 1 and nothing
here communicates. The training stages leave the process group to the Hugging Face Trainer (accelerate creates
it with the training arguments); the inference stages (cache_soft_labels, evaluate) open it with
``process_group``. Only rank 0 writes a stage's outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from latent_sft_core.config import ComputeParams, ParamsError

log = logging.getLogger(__name__)
# A JIT build of a DeepSpeed op takes about a minute on 2 cores; a build lock this old has no live builder.
STALE_BUILD_LOCK_SECONDS = 30 * 60
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one stage."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        """Read from the variables torchrun and deepspeed set (rank 0 of 1 without them)."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def compute_device(compute: ComputeParams) -> torch.device:
    """The device of this process: its GPU (``cuda:<local rank>``) or the CPU, as ``compute.device`` says."""
    wanted = compute.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ParamsError("compute.device is 'cuda' but this process sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device("cuda", World.from_environment().local_rank % torch.cuda.device_count())


def compute_dtype(compute: ComputeParams, device: torch.device) -> torch.dtype:
    """``compute.dtype``; ``auto`` is bf16 on a GPU that has it and fp32 elsewhere."""
    if compute.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, compute.dtype)


def communicating() -> bool:
    """Whether a process group of more than one process is open (collectives would block without the others)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def process_group() -> Iterator[World]:
    """Open the process group of a distributed inference stage (nccl with CUDA, else gloo) for the block, when
    several processes run and none is open yet; alone, nothing is opened."""
    world = World.from_environment()
    opened = world.size > 1 and not dist.is_initialized()
    if opened:
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())  # nccl's objects travel via it
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        log.info("rank %d of %d", world.rank, world.size)
    try:
        yield world
    finally:
        if opened:
            dist.destroy_process_group()


def barrier() -> None:
    if communicating():
        dist.barrier()


def close_process_group() -> None:
    """At the end of a stage: wait for every process, then close the process group, whoever opened it (the
    Trainer, DeepSpeed). Left open, gloo's threads are torn down at interpreter exit, which can abort a process
    whose work is done ("terminate called without an active exception", exit -6) and fail the whole stage."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_cpu(value):
    """``value`` with every tensor inside it (dataclass fields, lists, tuples, dicts) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: on_cpu(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    return value


def gathered_in_order(items: Sequence[Item], compute: Callable[[Item], Result]) -> Iterator[tuple[Item, Result]]:
    """``(item, compute(item))`` for every item, in the items' order, on every process.

    Alone, each item is computed in turn. Under several processes the items are dealt round-robin (process r
    computes items r, r + N, ...) and each round's results are exchanged, so every process yields the same
    sequence as one process would, while computing only its share. Every process must call this with the same
    items. Results come back on the CPU.
    """
    if not communicating():
        for item in items:
            yield item, compute(item)
        return
    rank, size = dist.get_rank(), dist.get_world_size()
    for start in range(0, len(items), size):
        mine = start + rank
        result = on_cpu(compute(items[mine])) if mine < len(items) else None
        gathered: list = [None] * size
        dist.all_gather_object(gathered, result)
        for offset, value in enumerate(gathered[: len(items) - start]):
            yield items[start + offset], value


def partitioned(parameters: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 has partitioned among the processes (each holds only its share of them
    outside the forward and backward of the module that owns them)."""
    return [parameter for parameter in parameters if hasattr(parameter, "ds_id")]


@contextmanager
def whole_parameters(parameters: Iterable[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Within the block, ``parameters`` are whole on every process. Under ZeRO-3 they are gathered from every
    process on entry, a collective: every process enters the block. ``modifier_rank``: the process whose changes to
    them are kept on exit (None: they are read only); without ZeRO-3 nothing needs doing."""
    sharded = partitioned(parameters)
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield


def extension_build_locks() -> list[Path]:
    """The lock files of torch's C++ extension builds (DeepSpeed JIT-builds its ops there, e.g. the CPU
    accelerator's ``deepspeed_shm_comm`` at every start), under ``TORCH_EXTENSIONS_DIR`` or torch's default root."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def clear_stale_build_locks(now: float | None = None) -> None:
    """A process killed while DeepSpeed builds an op leaves the build's lock file behind, and every later run
    then waits on it forever without a word (seen: train_latent killed in its first minute, the next two runs
    idle for good). Locks older than ``STALE_BUILD_LOCK_SECONDS`` are removed; a younger one is named in the log,
    since a run that stops here is waiting on it."""
    now = time.time() if now is None else now
    for lock in extension_build_locks():
        try:
            age = now - lock.stat().st_mtime
            if age > STALE_BUILD_LOCK_SECONDS:
                lock.unlink()
                log.warning("removed %s: a torch extension build lock %.0f min old, left by a killed build", lock,
                            age / 60)
            else:
                log.warning("%s exists: DeepSpeed waits until that build ends; if no other run is building it, "
                            "delete the file", lock)
        except FileNotFoundError:  # the build it guarded has just ended
            continue


def ensure_distributed_env() -> None:
    """Single-process defaults for DeepSpeed (torchrun and the deepspeed launcher set these themselves)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)
