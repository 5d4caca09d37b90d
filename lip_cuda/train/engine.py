"""Training and evaluation loops, learning-rate schedule, progress and metrics
log of ``lip_cuda.train``."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["RunLog", "lr_factor", "param_groups", "train_one_epoch", "evaluate", "format_duration"]


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``'1:02:05'``."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunLog:
    """Rank-0 output: progress lines on stdout and a JSON-lines metrics file.

    Every other rank stays silent and writes nothing.
    """

    def __init__(self, rank: int, metrics_path: Optional[Path]) -> None:
        self.active = rank == 0
        self.metrics_path = metrics_path if self.active else None

    def print(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)

    def record(self, kind: str, **fields: Any) -> None:
        if self.metrics_path is None:
            return
        line = json.dumps({"type": kind, "time": round(time.time(), 3), **fields}, default=str)
        # One write per line: a kill leaves at most a torn last line.
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str,
              milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step``
    (counted from 0 over the whole run).

    Linear warm-up over ``warmup_epochs`` to 1, then ``"cosine"`` decay to 0 at
    the end of ``epochs``, or ``"step"``: times ``gamma`` at each epoch in
    ``milestones``.

    Example::

        >>> lr_factor(0, 10, 5, 1, "cosine")     # first warm-up step
        0.1
        >>> lr_factor(30, 10, 5, 1, "cosine")    # half-way through the decay
        0.5
    """
    warm = warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if schedule == "cosine":
        total = epochs * steps_per_epoch
        t = (step - warm) / max(1.0, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    epoch = step // steps_per_epoch
    return gamma ** sum(1 for m in milestones if epoch >= m)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two SGD groups: weight decay on conv/linear weights, none on norm
    weights and biases (every tensor of one dimension or less)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _topk_correct(output: Tensor, target: Tensor, ks: Sequence[int]) -> List[Tensor]:
    pred = output.topk(max(ks), dim=1).indices
    hit = pred.eq(target.unsqueeze(1))
    return [hit[:, :k].any(dim=1).sum() for k in ks]


@dataclass
class StepContext:
    """What one training / evaluation pass needs besides the model."""

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    world_size: int
    distributed: bool

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: Tensor, target: Tensor):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return images, target.to(self.device, non_blocking=True)

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(t)
        return t


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: Optional[torch.amp.GradScaler], ctx: StepContext, log: RunLog, *,
                    epoch: int, epochs: int, steps: int, print_freq: int, global_batch: int,
                    on_step: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """One epoch of SGD. Returns the epoch's mean loss and top-1 over all
    processes, the images/s of the whole run and the epoch time.

    images/s counts the global batch of every step after the first (the
    first step carries one-off costs: allocator warm-up, cudnn autotuning,
    compilation).
    """
    model.train()
    sums = torch.zeros(3, device=ctx.device, dtype=torch.float64)  # loss * n, top-1 hits, n
    t_start = time.perf_counter()
    t_first = None
    window_t, window_steps = t_start, 0
    lr = optimizer.param_groups[0]["lr"]
    for i, (images, target) in enumerate(loader):
        images, target = ctx.to_device(images, target)
        with ctx.autocast():
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # fp16: the scaler skips the step on overflow, which the scheduler
            # takes for a wrong call order; the schedule stays on the step count.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
        n = target.numel()
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * n, _topk_correct(output.detach(), target, [1])[0].double(),
                                 torch.tensor(float(n), device=ctx.device, dtype=torch.float64)])
        if on_step is not None:
            on_step(i)
        window_steps += 1
        if i == 0:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            t_first = time.perf_counter()
        if (i + 1) % print_freq == 0 or i + 1 == steps:
            loss_now = loss.item()  # one host sync per print, not per step
            if not math.isfinite(loss_now):
                raise FloatingPointError(f"loss is {loss_now} at epoch {epoch + 1}, step {i + 1}; stopping")
            now = time.perf_counter()
            rate = window_steps * global_batch / max(now - window_t, 1e-9)
            per_step = (now - t_start) / (i + 1)
            eta_epoch = per_step * (steps - i - 1)
            eta_run = eta_epoch + per_step * steps * (epochs - epoch - 1)
            avg = (sums[0] / sums[2]).item()
            log.print(
                f"epoch {epoch + 1}/{epochs} step {i + 1:>{len(str(steps))}}/{steps}  loss {loss_now:.4f} "
                f"(avg {avg:.4f})  lr {lr:.4g}  {rate:.1f} img/s  "
                f"eta {format_duration(eta_epoch)} (run {format_duration(eta_run)})"
            )
            window_t, window_steps = now, 0
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    t_end = time.perf_counter()
    ctx.all_reduce(sums)
    loss_sum, hits, count = sums.tolist()
    if steps > 1 and t_first is not None:
        images_per_s = (steps - 1) * global_batch / max(t_end - t_first, 1e-9)
    else:
        images_per_s = steps * global_batch / max(t_end - t_start, 1e-9)
    return {
        "loss": loss_sum / max(count, 1),
        "top1": 100.0 * hits / max(count, 1),
        "images": int(count),
        "lr": lr,
        "images_per_s": images_per_s,
        "time_s": t_end - t_start,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, ctx: StepContext, num_classes: int) -> Dict[str, float]:
    """Top-1, top-5 (top-k with k = min(5, classes)) in percent and mean
    cross-entropy over the whole validation set, summed over all processes."""
    model.eval()
    k5 = min(5, num_classes)
    sums = torch.zeros(4, device=ctx.device, dtype=torch.float64)  # loss sum, top-1, top-5, n
    t0 = time.perf_counter()
    for images, target in loader:
        images, target = ctx.to_device(images, target)
        with ctx.autocast():
            output = model(images)
        loss = nn.functional.cross_entropy(output.float(), target, reduction="sum")
        c1, c5 = _topk_correct(output, target, [1, k5])
        sums += torch.stack([loss.double(), c1.double(), c5.double(),
                             torch.tensor(float(target.numel()), device=ctx.device, dtype=torch.float64)])
    ctx.all_reduce(sums)
    loss_sum, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "images": int(n),
            "time_s": time.perf_counter() - t0}
