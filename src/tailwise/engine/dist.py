"""Data parallelism under ``torchrun``: the process group, gradient averaging, global BatchNorm, collectives.

tailwise runs one process per device (``torchrun --nproc_per_node=N -m tailwise run ...``; NCCL on CUDA, gloo on
the CPU). Every process holds the whole model and the whole method state, draws the same global batches
(:class:`tailwise.data.loader.BatchLoader`) and trains on its :func:`~tailwise.data.loader.rank_slice` of each.
Three rules make N processes compute what one process computes on the same global batch:

1. **Loss share.** Process ``r`` back-propagates its loss times ``s_r = W_r * N_proc / W``, where ``W_r`` is the
   denominator of its loss's batch reduction (the number of its images for a mean, the sum of the class weights
   of its images for LDAM-DRW's weighted mean: ``LongTailLoss.batch_weight``) and ``W = sum_r W_r``; the
   gradients are then summed over processes and divided by ``N_proc`` (:meth:`Dist.sync_step`), giving
   ``sum_r (W_r / W) * grad L_r``: the gradient of the global batch's loss, exact also for uneven shares
   (DistributedDataParallel averages uniformly instead). A method's own training loss is weighted the same way,
   which is exact when it reduces like the run's loss (MORE's and growth's terms are plain means).
2. **Global BatchNorm.** In a training step every ``BatchNorm2d`` normalises with the statistics of the global
   batch (:class:`GlobalBatchNorm2d`, a differentiable all-reduce of per-channel moments; works on gloo and NCCL,
   unlike ``nn.SyncBatchNorm``), and its running statistics advance exactly as one process's would.
3. **Replicated decisions.** Whatever a method decides (LTAP's ranks, growth events, DO's masks) is computed from
   averaged gradients and gathered evaluations, and its scores are reduced across processes before ranking
   (:meth:`Dist.average_all_`, :meth:`Dist.sum_all_`), so every process takes the same decision; method
   randomness uses the same seed.
   At the end of every epoch rank 0's weights, buffers and momentum are broadcast (:meth:`Dist.broadcast_`),
   and a drift (non-deterministic GPU kernels) is reported in ``metrics.jsonl``.

Gradients are averaged explicitly after ``backward`` rather than through the ``DistributedDataParallel`` wrapper:
methods replace layers in place (pruning's shrink, growth surgery), run several forwards per step (MORE) and
read ``ctx.model``'s modules and gradients directly; an explicit all-reduce of one flat buffer per step keeps all
of that working unchanged, with nothing to rebuild after surgery. The price is no overlap of communication with
the backward pass. Rank 0 alone writes files; every process reads checkpoints (the run directory must be on a
file system all processes see).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

_GLOBAL_BN = False  # True inside Dist.data_parallel(): BatchNorm layers use the global batch's statistics


@dataclass
class Dist:
    """This process's place in the data-parallel job (``rank 0 of 1`` when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------- collectives
    @torch.no_grad()
    def _bucketed(self, tensors: list[torch.Tensor | None], collective) -> None:
        """Apply ``collective(flat)`` (in place) to one flat buffer per dtype of the non-None ``tensors``, on the
        backend's device (NCCL handles CUDA tensors only: CPU tensors such as channel scores travel to the GPU
        and back), and copy the results back into the tensors."""
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            if t is not None:
                buckets.setdefault(t.dtype, []).append(t)
        device = self.device_for_collectives()
        for group in buckets.values():
            flat = torch.cat([t.reshape(-1).to(device) for t in group])
            collective(flat)
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view_as(t))

    def average_all_(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """In place: the mean over processes of every non-None tensor (identity for one process)."""
        if self.enabled:
            def mean(flat):
                tdist.all_reduce(flat)
                flat /= self.world

            self._bucketed(tensors, mean)
        return tensors

    def sum_all_(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """In place: the sum over processes of every non-None tensor (identity for one process)."""
        if self.enabled:
            self._bucketed(tensors, tdist.all_reduce)
        return tensors

    def broadcast_(self, tensors: list[torch.Tensor | None]) -> bool:
        """In place: rank 0's values of every non-None tensor on every process. Returns True on every process
        if any process held different values (the replicas had drifted)."""
        if not self.enabled:
            return False
        drifted = []

        def from_rank0(flat):
            mine = flat.clone()
            tdist.broadcast(flat, src=0)
            drifted.append(not torch.equal(mine, flat))

        self._bucketed(tensors, from_rank0)
        return self.any(any(drifted))

    def totals(self, values: list[float]) -> list[float]:
        """The sums over processes of ``values`` (counters, loss sums), in one float64 all-reduce."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device_for_collectives())
        tdist.all_reduce(t)
        return t.tolist()

    def sync_step(self, params: list[nn.Parameter], totals: list[float]) -> list[float]:
        """After ``backward`` of the share-scaled loss: average the gradients of ``params`` over processes and
        sum ``totals`` (per-step counters: loss sum, images, correct). Returns the summed totals; for one process
        the gradients are untouched."""
        self.average_all_([p.grad for p in params])
        return self.totals(totals)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate the processes' ``tensor`` (any length along dim 0) in rank order, on every process."""
        if not self.enabled:
            return tensor
        tensor = tensor.to(self.device_for_collectives())
        size = torch.tensor([len(tensor)], dtype=torch.long, device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        tdist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        tdist.all_gather(parts, padded)
        return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any."""
        return self.totals([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def device_for_collectives(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def data_parallel(self):
        """The span of one training step: BatchNorm layers normalise with the global batch's statistics."""
        global _GLOBAL_BN
        if not self.enabled:
            yield
            return
        previous, _GLOBAL_BN = _GLOBAL_BN, True
        try:
            yield
        finally:
            _GLOBAL_BN = previous


def launched() -> tuple[int, int]:
    """(rank, world size) of this process as torchrun's environment describes it; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def from_environment(device_setting: str = "auto") -> tuple[Dist, str]:
    """Join the torchrun job described by ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (no-op without them).

    Returns the :class:`Dist` and the device setting to use: ``cuda:LOCAL_RANK`` for CUDA runs (NCCL), the
    given setting otherwise (gloo)."""
    rank, world = launched()
    if world <= 1:
        return Dist(), device_setting
    local = int(os.environ.get("LOCAL_RANK", "0"))  # this node's GPU
    use_cuda = device_setting.startswith("cuda") or (device_setting == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
        device_setting = f"cuda:{local}"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, backend), device_setting


class _AllReduceSum(torch.autograd.Function):
    """``sum_r x_r`` on every process; the gradient of each ``x_r`` is the sum of all processes' upstream
    gradients (every process's loss depends on every ``x_r``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        tdist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        tdist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the global batch inside
    :meth:`Dist.data_parallel`: every process computes its images' per-channel mean ``m_r`` and biased variance
    ``v_r`` (two-pass, stable), and one differentiable all-reduce in float64 of ``(n_r m_r, n_r (v_r + m_r^2),
    n_r)`` gives the global mean ``M = sum n_r m_r / n`` and variance ``sum n_r (v_r + m_r^2) / n - M^2``. The
    running variance uses the unbiased global variance, as one process would. One collective forward and one
    backward per layer (gloo latency dominates on the CPU). Outside a data-parallel step, or in eval mode, it is
    exactly ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_GLOBAL_BN and self.training and tdist.is_initialized()):
            return super().forward(x)
        channels = x.shape[1]
        var_local, mean_local = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        n = x.numel() / channels
        mean64 = mean_local.double()
        local = torch.cat([mean64 * n, (var_local.double() + mean64 * mean64) * n, mean64.new_tensor([n])])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        scale = torch.rsqrt(var + self.eps).to(x.dtype)  # y = x * a + b: one fused pass over the activations
        a = scale * self.weight if self.affine else scale
        b = (self.bias if self.affine else 0) - mean.to(x.dtype) * a
        return torch.addcmul(b.view(1, -1, 1, 1), x, a.view(1, -1, 1, 1))


def use_global_batchnorm(model: nn.Module) -> nn.Module:
    """Make every plain ``BatchNorm2d`` of ``model`` a :class:`GlobalBatchNorm2d` (in place: same parameters
    and buffers, only the class changes; idempotent, so it can follow any surgery)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return model
