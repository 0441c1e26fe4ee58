"""Running on several processes with ``torchrun``: the process group, who writes, and sharded batches.

qrobust builds nothing of its own for process management or communication: ``torchrun`` starts the
processes and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init` opens the
``torch.distributed`` process group (NCCL when the device is a GPU, gloo on CPU) and gives each rank its
local GPU. Without those variables (an ordinary ``qrobust ...``), nothing here talks to anyone: every
helper takes the single-process path, with no process group and no copies.

Sharded evaluation (:func:`map_batches`) splits the images into batches of a FIXED size and gives batch
``i`` to rank ``i % world_size``; the per-batch outputs are gathered, in batch order, on every rank.
Every random draw of a batch comes from streams that depend only on the seed and the batch index
(:func:`batch_seed`; the global RNG is reseeded before each batch, attacks seed their own generator
per call): so for a fixed batch size, the numbers drawn for an image are a function of the seed and the
image's index, and N ranks give exactly the per-image results of one process.

Training (:func:`ddp_model`, :func:`train_batches`, hooked into :func:`qrobust.train.train`):
DistributedDataParallel with a :class:`~torch.utils.data.DistributedSampler`, the global batch split over
the ranks, rank 0 writing state and checkpoint; on a GPU, bfloat16 autocast on channels-last tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from qrobust.errors import QrobustError

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """What ``torchrun`` told this process (rank 0 of 1 when started without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def multi(self) -> bool:
        return self.world_size > 1


def launch_env(environ: dict[str, str] | None = None) -> Launch:
    """Rank, world size and local rank from torchrun's environment variables."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return Launch()
    try:
        launch = Launch(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        got = f"{env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}"
        raise QrobustError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (torchrun sets them), got {got}"
                           ) from exc
    if not 0 <= launch.rank < launch.world_size:
        raise QrobustError(f"RANK {launch.rank} is outside WORLD_SIZE {launch.world_size}; start the "
                           "processes with torchrun")
    return launch


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank (and not in :func:`solo`)."""
    return _initialized() and world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """Whether this process writes results, checkpoints and reports (rank 0, or the only process)."""
    return rank() == 0


def _initialized() -> bool:
    return not _SOLO and torch.distributed.is_available() and torch.distributed.is_initialized()


_SOLO: list[bool] = []  # inside solo(): this process acts alone


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Work that one rank does alone (rank 0 training a missing model while the others wait): inside,
    this process sees a world of one (it is rank 0 of 1), so nothing in it waits for the other ranks (no
    DDP, no gathers) and it writes what it makes."""
    _SOLO.append(True)
    try:
        yield
    finally:
        _SOLO.pop()


def backend_for(device: torch.device | str) -> str:
    """NCCL for GPUs, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: torch.device | str = "cpu") -> bool:
    """Open the process group if torchrun started several processes; returns whether it did.

    Single process (no torchrun variables, or WORLD_SIZE=1): returns False and does nothing. On a GPU
    machine the rank's local GPU (``LOCAL_RANK``) becomes the current device, so ``--device
    cuda``/``auto`` means "my GPU" on every rank.
    """
    launch = launch_env()
    if not launch.multi:
        return _initialized()
    if not torch.distributed.is_available():
        raise QrobustError("torchrun started several processes but this PyTorch build has no "
                           "torch.distributed; install a build with it or run one process")
    if torch.distributed.is_initialized():
        return True
    if torch.cuda.is_available():  # "cuda" (and --device auto) then means this rank's GPU
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend_for(device))
    return True


def destroy() -> None:
    """Close the process group if one is open (safe to call always)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device | str = "cpu") -> Iterator[bool]:
    """:func:`init` for the block, then :func:`destroy`; yields whether several ranks run.

    What the ``qrobust`` command wraps every subcommand in: under torchrun, ranks other than 0 compute
    their share silently (their standard output is discarded, so results are printed once).
    """
    multi = init(device)
    try:
        if multi and not is_main():
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                yield multi
        else:
            yield multi
    finally:
        destroy()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects); the object itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------
# Sharded batches
# ----------------------------------------------------------------------------------------------------


def batch_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for batch ``index`` of a run seeded ``seed`` (stable across versions)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(index)]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the batches of ``n`` items, in order."""
    if batch_size <= 0:
        raise QrobustError(f"batch size must be positive, got {batch_size}")
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def my_batches(n: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """``(index, start, stop)`` of the batches this rank computes: batch i goes to rank i % world size."""
    r, w = rank(), world_size()
    for i, (s, e) in enumerate(batch_bounds(n, batch_size)):
        if i % w == r:
            yield i, s, e


def _to(obj: Any, device: torch.device | str | None) -> Any:
    """``obj`` with every tensor moved to ``device`` (through dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def map_batches(
    fn: Callable[[int, int], T],
    n: int,
    batch_size: int,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[T]:
    """``[fn(start, stop) for every batch]``, sharded over the ranks and gathered, in batch order, on all.

    ``seed``: the global RNG is seeded with :func:`batch_seed` ``(seed, i)`` before batch ``i`` (dropout
    masks drawn from it then belong to the batch, not to the order batches ran in). Under torchrun the
    tensors in the outputs travel through the CPU and come back on ``device``; a single process calls
    ``fn`` on every batch in order and returns its outputs untouched. ``progress(done, n)`` is called on
    rank 0 (with this rank's share scaled to the whole when distributed).
    """
    mine: list[tuple[int, T]] = []
    for i, s, e in my_batches(n, batch_size):
        if seed is not None:
            torch.manual_seed(batch_seed(seed, i))
        mine.append((i, fn(s, e)))
        if progress is not None and is_main():
            progress(e if not is_distributed() else min(n, len(mine) * world_size() * batch_size), n)
    if not is_distributed():
        return [out for _, out in mine]
    gathered = all_gather(_to(mine, "cpu"))
    ordered = sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])
    return [_to(out, device) for _, out in ordered]


def cat_batches(outputs: list[dict[str, torch.Tensor]], key: str, dim: int = 0) -> torch.Tensor:
    """One field of :func:`map_batches` outputs, concatenated along ``dim``."""
    return torch.cat([o[key] for o in outputs], dim=dim)


# ----------------------------------------------------------------------------------------------------
# Training (DistributedDataParallel)
# ----------------------------------------------------------------------------------------------------


def rank_batch_size(batch_size: int) -> int:
    """Images per rank and step: the global ``--batch-size`` split over the ranks, so the same flags give
    the same effective batch (DDP averages the ranks' gradients) on any number of processes."""
    return max(1, -(-batch_size // world_size()))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``n`` images (every rank takes the same number)."""
    per_rank = -(-n // world_size())
    return -(-per_rank // rank_batch_size(batch_size))


def train_batches(split: Any, config: Any, *, epoch: int, generator: torch.Generator,
                  device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled training batches of this rank (``config``: a TrainConfig).

    One process: ``split.batches`` shuffled by ``generator`` (unchanged). Under torchrun:
    :class:`~torch.utils.data.DistributedSampler` (seeded ``config.seed``, reshuffled per epoch) gives each
    rank its share of one permutation, in batches of :func:`rank_batch_size`.
    """
    batch_size, seed = config.batch_size, config.seed
    if not is_distributed():
        yield from split.batches(batch_size, shuffle=True, generator=generator, device=device)
        return
    from torch.utils.data import DistributedSampler

    from qrobust.data import to_float

    sampler = DistributedSampler(range(len(split)), num_replicas=world_size(), rank=rank(), shuffle=True,
                                 seed=seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    per = rank_batch_size(batch_size)
    for i in range(0, len(order), per):
        idx = order[i : i + per]
        yield to_float(split.x[idx]).to(device, non_blocking=True), split.y[idx].to(device, non_blocking=True)


class GPUAutocast(torch.nn.Module):
    """Forward under ``torch.autocast`` (bfloat16) on channels-last inputs, float32 logits out: how the
    training loop steps a model on a GPU (tensor cores; bfloat16 needs no loss scaling). Holds ``model``
    itself, so its weights and checkpoint stay float32 and unchanged."""

    def __init__(self, model: torch.nn.Module, device_type: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x).float()


def ddp_model(model: torch.nn.Module, device: torch.device | str, *, adversarial: bool = False
              ) -> torch.nn.Module:
    """The module the training loop steps: ``model`` under :class:`GPUAutocast` on a GPU with bfloat16
    (weights moved to channels-last), wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`
    under torchrun (gradients averaged over the ranks in the backward pass; the weights start from rank
    0's); on CPU in one process, ``model`` itself. ``adversarial`` training is refused under torchrun
    (:func:`check_trainable`) and runs in float32 (its attack differentiates the inputs)."""
    check_trainable(adversarial)
    dev = torch.device(device)
    if dev.type == "cuda" and not adversarial and torch.cuda.is_bf16_supported():
        model = GPUAutocast(model.to(memory_format=torch.channels_last))
    if not is_distributed():
        return model
    ids = None
    if dev.type == "cuda":
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()]
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def check_trainable(adversarial: bool) -> None:
    """Refuse what DDP training does not support yet: adversarial training differentiates the inputs only,
    which leaves DDP waiting for weight gradients."""
    if adversarial and is_distributed():
        raise QrobustError("adversarial training under torchrun is not supported yet; train it in one "
                           "process (without torchrun), or train without --adv-* options")


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over the ranks (epoch loss, correct, seen); the values themselves in one process."""
    return [sum(col) for col in zip(*all_gather(list(values)), strict=True)]


__all__ = ["GPUAutocast", "Launch", "all_gather", "backend_for", "barrier", "batch_bounds", "batch_seed",
           "broadcast", "cat_batches", "check_trainable", "ddp_model", "destroy", "init", "is_distributed",
           "is_main", "launch_env", "map_batches", "my_batches", "rank", "rank_batch_size", "session", "solo",
           "steps_per_epoch", "sum_over_ranks", "train_batches", "world_size"]
