"""Process groups under ``torchrun`` and the feature gather that global-batch losses need.

``init_distributed()`` joins the group torchrun describes in the environment (a plain
``python`` run stays a single process); ``all_gather_with_grad`` concatenates a tensor from all
ranks so that each rank's loss sees every negative of the global batch, with gradients flowing
back to the rank that owns each row; ``collective_errors`` turns a peer's death or silence into
one clear :class:`~cliplab.errors.DistributedError` instead of a hang or a C++ traceback.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cliplab.errors import ConfigError, DistributedError

DEFAULT_TIMEOUT_S = 600.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_timeout_s = DEFAULT_TIMEOUT_S
_joined_here = False  # init_distributed made the group, so shutdown ends it
_left_here = False  # shutdown ended a group init_distributed made: torch joins one only once
_meshes: dict[str, DeviceMesh] = {}  # by device type: the meshes FSDP shards on, see shutdown()


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank, the number of ranks, its device and backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"distributed run: environment variable {name} is not set "
                          f"(launch with torchrun, which sets {', '.join(_TORCHRUN_VARS)})")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"distributed run: {name}={value!r} is not an integer") from None


def init_distributed(backend: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing is initialised and the process is
    rank 0 of 1. ``backend`` defaults to nccl when CUDA is available, else gloo. A collective that
    waits longer than ``timeout_s`` (a rank died or hangs) fails instead of blocking forever.
    A group the caller made already (``dist.init_process_group``) is used as it is, and
    :func:`shutdown` leaves it to them.
    """
    global _timeout_s, _joined_here
    if timeout_s <= 0:
        raise ConfigError(f"distributed timeout must be > 0 seconds, got {timeout_s}")
    world = launched_world_size()
    if world <= 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, 0, device, None)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"distributed run: environment variable {name} is not set "
                              "(launch with torchrun)")
    if not 0 <= rank < world:
        raise ConfigError(f"distributed run: RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("distributed backend nccl needs CUDA; use backend=gloo on CPU")
        if local_rank >= torch.cuda.device_count():  # one GPU per local rank
            raise ConfigError(f"distributed run: LOCAL_RANK={local_rank}, but this machine "
                              f"shows {torch.cuda.device_count()} GPU(s); launch at most that "
                              "many ranks per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if _left_here:  # a second join fails late, as a peer's reset connection or a timeout
            raise DistributedError(
                f"rank {rank} of {world}: this process already joined and left a process group "
                "(a second training in one torchrun launch), and torch cannot join one twice; "
                "make the group yourself (torch.distributed.init_process_group) before the "
                "first training: cliplab then uses it and leaves it to you")
        try:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {rank} of {world}: cannot join the process group at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} with {backend}: "
                f"{_first_line(e)}") from e
        _joined_here = True
    _timeout_s = timeout_s
    return DistInfo(rank, world, local_rank, device, backend)


def launched_world_size() -> int:
    """The number of ranks torchrun launched (``WORLD_SIZE``; 1 without torchrun), known before
    the process group is joined."""
    return _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1


def backend_for(device: torch.device) -> str:
    """The process group's backend for ranks training on ``device`` (nccl moves CUDA tensors
    only; gloo CPU ones). A fixed GPU (``cuda:N``) is refused over several ranks: each rank
    takes its own (``LOCAL_RANK``), or all of them would share GPU N."""
    if device.type == "cuda" and device.index is not None and launched_world_size() > 1:
        raise ConfigError(f"train.device={device} under torchrun puts every rank on GPU "
                          f"{device.index}; use cuda or auto (each rank takes GPU LOCAL_RANK)")
    return "nccl" if device.type == "cuda" else "gloo"


def sharding_mesh(device: torch.device) -> DeviceMesh:
    """The one-dimensional mesh over every rank that FSDP shards on (made once per device
    type; :func:`shutdown` lets go of its process group)."""
    if device.type not in _meshes:
        _meshes[device.type] = init_device_mesh(device.type, (world_size(),))
    return _meshes[device.type]


def shutdown() -> None:
    """Leave the process group that :func:`init_distributed` made and end its threads now
    (no-op for a single process). A group the caller made stays theirs, so that one script can
    run several trainings in one torchrun launch (torch cannot join a group twice).

    Call it once nothing holds a sharded model. ``destroy_process_group`` only forgets the
    group: FSDP's mesh, which torch's DTensor caches keep alive, still holds it, and with it
    gloo's worker threads, until the interpreter exits. A worker thread that then releases a
    finished collective's tensors needs the GIL the exiting interpreter no longer hands out,
    and the process aborts ("terminate called without an active exception"). Dropping the
    meshes' hold on the group (their private group registry) and collecting the model's
    reference cycles destroys the group here, which joins its threads.
    """
    global _joined_here, _left_here
    if not is_distributed():
        return
    if _joined_here:
        dist.destroy_process_group()
        _joined_here, _left_here = False, True
    for mesh in _meshes.values():
        getattr(mesh, "_pg_registry", {}).clear()
    _meshes.clear()
    gc.collect()


def is_distributed() -> bool:
    """True when a process group is initialised (more than nothing to gather from)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _peer_failure(what: str, e: BaseException) -> DistributedError:
    return DistributedError(
        f"rank {rank()} of {world_size()}: {what} failed: another rank stopped or did not answer "
        f"within the {_timeout_s:g} s timeout; its log has its own error, or it was still busy "
        f"(with eval_every, rank 0 evaluates while the others wait: if that takes longer, "
        f"raise train.dist_timeout_s) (here: "
        f"{type(e).__name__}: {_first_line(e)})")


# Markers of errors from torch.distributed's backends (gloo, NCCL, c10d) that are raised as a
# plain RuntimeError, e.g. by DDP's gradient all-reduce when a peer has gone.
_BACKEND_MARKERS = ("gloo", "nccl", "c10d", "processgroup", "connection closed", "timed out")


def _collective(what: str, fn, *args, **kwargs):
    """Run one torch.distributed call, turning its failure into a DistributedError."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistError subclasses RuntimeError; gloo raises either
        raise _peer_failure(what, e) from e


@contextlib.contextmanager
def collective_errors(what: str = "a collective") -> Iterator[None]:
    """Turn a failed collective inside the block into one :class:`DistributedError` line.

    Wrap a training step (forward *and* backward: the gather's backward and DDP's gradient
    all-reduce are collectives too). cliplab's own collectives already raise DistributedError;
    this also translates torch.distributed's errors (DDP's, say); others propagate unchanged.
    """
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:
        text = str(e).lower()
        if isinstance(e, dist.DistError) or any(m in text for m in _BACKEND_MARKERS):
            raise _peer_failure(what, e) from e
        raise


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``n`` (e.g. its local batch size), in rank order."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    _collective("all_gather of batch sizes", dist.all_gather, out, local)
    return [int(t) for t in out]


def _gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    longest = max(sizes)
    x = x.contiguous()
    if len(x) < longest:  # all_gather needs equal shapes on every rank: pad, then cut
        x = torch.cat([x, x.new_zeros((longest - len(x), *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    _collective("all_gather of features", dist.all_gather, parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate ``x`` from all ranks along dim 0; backward sums every rank's gradient of the
    gathered tensor (all_reduce) and keeps this rank's rows.

    Written out rather than ``torch.distributed.nn.functional.all_gather``: that one is
    deprecated in torch 2.13 (its suggested replacement is private), needs equal sizes on
    every rank, and on gloo emulates reduce-scatter with all-to-all; all_reduce works on every
    backend and the tests check both against a single process.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        r = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:r]), sum(sizes[:r + 1])
        return _gather(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        _collective("all_reduce of gathered gradients", dist.all_reduce, grad,
                    op=dist.ReduceOp.SUM)
        return grad[ctx.start:ctx.stop], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 in rank order, differentiable.

    The gradient reaching each rank's ``x`` is the sum over ranks of their losses' gradients
    with respect to its rows; with DDP averaging the towers' gradients, every rank then holds
    the gradient of the global-batch loss (the mean of the ranks' losses). ``sizes`` (every
    rank's ``len(x)``, from :func:`gather_sizes`) saves a collective when known. Identity when
    not distributed.
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(len(x), x.device)
    if len(sizes) != world_size() or sizes[rank()] != len(x):
        raise ValueError(f"all_gather_with_grad: sizes {sizes} do not match this rank's "
                         f"{len(x)} rows and world size {world_size()}")
    if not x.requires_grad:  # e.g. integer keys: a plain gather
        return _gather(x, sizes)
    return _AllGatherWithGrad.apply(x, sizes)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (detached) tensor over ranks, e.g. the global-batch loss from each rank's
    share of it (for logging; no gradient)."""
    value = value.detach().clone()
    if is_distributed():
        _collective("all_reduce of a logged value", dist.all_reduce, value, op=dist.ReduceOp.SUM)
        value /= world_size()
    return value


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_distributed():
        _collective("barrier", dist.barrier)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks, in one coalesced all_reduce.

    The trainer's equivalent of DDP's gradient averaging: DDP's reducer needs every forward to
    go through its wrapper and would all-reduce once per GradCache chunk, while the trainer
    calls the towers directly and needs one reduction per optimizer step. A parameter without
    a gradient on this rank contributes zeros (every rank must send the same shapes); one
    without a gradient on every rank keeps none, as in one process (AdamW then skips it: a
    zero gradient would still decay it and move its moments).
    """
    if not is_distributed() or not params:
        return
    missing = [p.grad is None for p in params]
    grads = [torch.zeros_like(p) if gone else p.grad for p, gone in zip(params, missing)]
    has_grad = torch.tensor([0.0 if gone else 1.0 for gone in missing], device=params[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [has_grad])
    _collective("all_reduce of gradients", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    # which parameters some rank has a gradient for: read back (a device sync) only by a rank
    # missing one, since a rank holding every gradient knows them all to be present
    present = flat[len(flat) - len(params):].tolist() if any(missing) else [1.0] * len(params)
    flat /= world_size()
    offset = 0
    for p, g, n_ranks in zip(params, grads, present):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if n_ranks else None
        offset += n


@torch.no_grad()
def broadcast_weights(*modules: torch.nn.Module | None) -> None:
    """Rank 0's parameters and buffers in every rank's ``modules`` (as DDP does at its start):
    ranks that built a model with another seed, or none, train one model, not N mixed."""
    if not is_distributed():
        return
    for module in filter(None, modules):
        for tensor in [*module.parameters(), *module.buffers()]:
            _collective("broadcast of the starting weights", dist.broadcast, tensor.data,
                        src=0)


def broadcast_from_rank0(value):
    """Rank 0's ``value`` (any picklable object) on every rank, e.g. a run-folder name that
    holds a timestamp."""
    if not is_distributed():
        return value
    box = [value]
    _collective("broadcast from rank 0", dist.broadcast_object_list, box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order."""
    if not is_distributed():
        return [value]
    out = [None] * world_size()
    _collective("all_gather of objects", dist.all_gather_object, out, value)
    return out
