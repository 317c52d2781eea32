"""torchrun support: process group from the environment, rank helpers, object collectives.

Every function is a no-op (or the identity) in a plain single process, so library code calls them
unconditionally and runs unchanged under ``torchrun --nproc_per_node N`` (one process per GPU, or
several CPU processes with gloo). The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``; multi-node runs use the usual ``--nnodes/--rdzv_*`` arguments.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group torchrun describes; returns whether this run is distributed.

    Idempotent. The backend defaults to nccl when CUDA is available, else gloo. On CUDA each
    process is pinned to the GPU ``LOCAL_RANK``, so ``device="cuda"`` means that GPU.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, init_method="env://")
    # Tear the group down before interpreter shutdown: a gloo group left to the C++ destructors can
    # abort the process ("terminate called without an active exception") after the work is done.
    atexit.register(_shutdown)
    log.info("process group up: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def _shutdown() -> None:
    # No barrier here: a rank exiting on an error must not wait for the others.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 writes checkpoints, manifests and logs; the others only compute."""
    return rank() == 0


def barrier() -> None:
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (picklable objects; e.g. a filter selection)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; on the collective's device for nccl)."""
    if not is_distributed():
        return t
    dev = _collective_device()
    out = t.detach().to(dev if dev is not None else t.device).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


@contextmanager
def global_batch_norm(net: nn.Module) -> Iterator[None]:
    """Every BatchNorm of ``net`` normalises a training batch with the statistics of the global
    batch, all ranks' shares together, while the context lasts (a no-op in one process).

    Without it each rank normalised its own share (half the batch under two processes): another
    model than one process trains, and on a small batch a noisier one. torch's SyncBatchNorm would
    do this on GPUs but refuses CPU tensors, and it is a module swap the caller would have to undo
    before surgery and export; here the modules stay as they are and only their ``forward`` is
    shadowed for the duration.
    """
    if not is_distributed():
        yield
        return
    bns = [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" not in vars(m)
    ]
    for m in bns:
        m.forward = functools.partial(_global_bn_forward, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in bns:
            del m.forward


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the incoming gradients over the ranks too: each rank's
    loss depends on every rank's share of the statistics."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.contiguous())


def _global_bn_forward(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not m.training:
        return type(m).forward(m, x)
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    shape = [1, c] + [1] * (x.dim() - 2)
    # sums around a shift every rank shares (the running mean): E[x^2] - E[x]^2 without cancellation
    shift = m.running_mean.detach().clone().view(shape) if m.running_mean is not None else x.new_zeros(shape)
    d = (x - shift).float()
    local = torch.cat([d.sum(dims), (d * d).sum(dims), d.new_full((1,), x.numel() // c)])
    total = _SumOverRanks.apply(local)
    n = total[-1]
    offset = total[:c] / n
    var = (total[c : 2 * c] / n - offset * offset).clamp_min(0)
    mean = shift.view(-1) + offset
    if m.track_running_stats and m.running_mean is not None and m.running_var is not None:
        with torch.no_grad():
            m.num_batches_tracked.add_(1)  # type: ignore[union-attr, operator]
            f = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            m.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            m.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=f)
    y = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var.view(shape) + m.eps).to(x.dtype)
    if m.affine:
        y = y * m.weight.view(shape) + m.bias.view(shape)
    return y.to(x.dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / ``torch.compile`` wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or (
        hasattr(model, "module") and isinstance(getattr(model, "module", None), nn.Module)
    ):
        model = model.module
    return getattr(model, "_orig_mod", model)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cuda"`` means this process's GPU (``LOCAL_RANK``) under torchrun."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank() if launched_by_torchrun() else torch.cuda.current_device())
    return dev


def _collective_device() -> torch.device | None:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None
