"""``lip_cuda.train`` main: set up the processes, check every input, then
train and evaluate."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .archs import build_model, lookup_arch
from .checkpoint import FORMAT, atomic_save, check_arch, load_checkpoint, load_weights, reference_state_dict
from .cli import parse_args, resolve_batch_size
from .data import build_data
from .engine import RunLog, StepContext, evaluate, format_duration, lr_factor, param_groups, train_one_epoch
from .errors import TrainConfigError

__all__ = ["main", "cli"]

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dist_env() -> tuple:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainConfigError("--device cuda but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise TrainConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                f"use --nproc-per-node <= the GPU count"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**63)


def _checkpoint(args, raw_model: nn.Module, optimizer, scheduler, scaler, *, epoch: int, best: float,
                best_epoch: int, global_step: int, world_size: int, batch: int, classes) -> Dict[str, Any]:
    return {
        "format": FORMAT,
        "epoch": epoch,
        "arch": args.arch,
        "state_dict": reference_state_dict(raw_model),
        "best_acc1": best,
        "best_epoch": best_epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "global_step": global_step,
        "world_size": world_size,
        "batch_size": batch,
        "num_classes": len(classes),
        "classes": list(classes),
        "args": {k: v for k, v in vars(args).items() if k != "debug_dump"},
    }


def _sync_buffers(model: nn.Module, distributed: bool) -> None:
    # Each rank's last forward updated its BN statistics with its own batch:
    # take rank 0's so that evaluation and the checkpoint agree everywhere.
    if distributed:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def main(argv: Optional[Sequence[str]] = None, *, _stop_after_epoch: Optional[int] = None) -> Dict[str, Any]:
    """Run ``python -m lip_cuda.train`` with ``argv``; return the summary.

    Under torchrun (``WORLD_SIZE`` > 1) it joins the process group (NCCL on
    GPUs, gloo on the CPU) and trains with DistributedDataParallel. Raises
    :class:`TrainConfigError` for bad input before any training step.

    Example::

        >>> summary = main(["--synthetic", "64", "--image-size", "32", "--arch", "lip_smoke",
        ...                 "--num-classes", "10", "--batch-size", "8", "--epochs", "1"])  # doctest: +SKIP
        >>> summary["val"]["top1"]                                                          # doctest: +SKIP
    """
    args = parse_args(argv)
    arch = lookup_arch(args.arch)
    world, rank, local_rank = _dist_env()
    distributed = world > 1
    batch = resolve_batch_size(args, world)
    device = _pick_device(args.device, local_rank)
    # Checkpoints are read (and their arch checked) before anything starts.
    resume_ckpt = load_checkpoint(args.resume, "--resume", args.trust_checkpoint) if args.resume else None
    if resume_ckpt is not None:
        check_arch(resume_ckpt, args.arch, args.resume, "--resume")
        if resume_ckpt.get("format") != FORMAT or "optimizer" not in resume_ckpt:
            if not args.evaluate:
                raise TrainConfigError(
                    f"--resume {args.resume} is not a checkpoint of lip_cuda.train (no scheduler/optimizer state); "
                    f"use --weights to start a new run from its weights"
                )
    weights_ckpt = load_checkpoint(args.weights, "--weights", args.trust_checkpoint) if args.weights else None
    if weights_ckpt is not None:
        check_arch(weights_ckpt, args.arch, args.weights, "--weights")
    if not args.evaluate and args.image_size < arch.min_image_size:
        raise TrainConfigError(
            f"--image-size {args.image_size} is too small for --arch {args.arch}: it takes {arch.min_image_size} "
            f"and up (its logit modules' InstanceNorms need more than one position)"
        )
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not output.is_dir():
        raise TrainConfigError(f"--output {output} exists and is not a directory")
    if output is not None and not output.exists():
        parent = next((p for p in output.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise TrainConfigError(f"--output {output} cannot be created: {parent} is not a writable directory")
    if output is not None and not args.evaluate and not args.resume and (output / "checkpoint.pth").exists():
        raise TrainConfigError(
            f"--output {output} already holds checkpoint.pth from an earlier run: pass --resume "
            f"{output / 'checkpoint.pth'} to continue it, or choose another --output"
        )
    args.batch_size = batch

    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        result = _run(args, arch, rank, world, device, distributed, resume_ckpt, weights_ckpt, output,
                      _stop_after_epoch)
        if distributed:
            # every rank done (rank 0 may still be writing checkpoints) before
            # any tears gloo down: a rank that destroyed its group while its
            # peer was still in flight aborted once in CI ("terminate called
            # without an active exception") after a complete run. Only on
            # success: a collective after a failure on one rank would hang.
            dist.barrier()
        return result
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, arch, rank, world, device, distributed, resume_ckpt, weights_ckpt, output, stop_after):
    _seed_everything(args.seed)
    data = build_data(args, rank, world, device, record_indices=bool(args.debug_dump))
    model = build_model(args.arch, data.num_classes, args.lip_backend)
    init_ckpt, init_what, init_path = (
        (resume_ckpt, "--resume", args.resume) if resume_ckpt is not None else (weights_ckpt, "--weights", args.weights)
    )
    if init_ckpt is not None:
        load_weights(model, init_ckpt, args.arch, init_path, init_what)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    raw_model = model

    if output is not None and rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    log = RunLog(rank, output / "metrics.jsonl" if output is not None else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = StepContext(device, AMP_DTYPES[args.amp], args.channels_last, world, distributed)
    global_batch = args.batch_size * world
    nparams = sum(p.numel() for p in raw_model.parameters())
    lip_note = f"{args.lip_backend} LIP" if arch.has_lip else "no LIP"
    log.print(
        f"lip_cuda.train: {args.arch} ({nparams / 1e6:.2f}M parameters, {lip_note}) on "
        f"{world} x {device.type}{' (' + dist.get_backend() + ')' if distributed else ''}, "
        f"{data.num_classes} classes, {data.num_train} train / {data.num_val} val images"
    )
    eval_model = torch.compile(raw_model) if args.compile else raw_model

    if args.evaluate:
        res = evaluate(eval_model, data.val_loader, ctx, data.num_classes)
        log.print(f"evaluate: top1 {res['top1']:.3f}%  top5 {res['top5']:.3f}%  loss {res['loss']:.4f}  "
                  f"({res['images']} images, {format_duration(res['time_s'])})")
        log.record("eval", weights=args.weights or args.resume, arch=args.arch, **res)
        return {"mode": "evaluate", "val": res}

    steps = len(data.train_loader)
    lr = args.lr * global_batch / args.lr_base_batch
    optimizer = torch.optim.SGD(param_groups(raw_model, args.weight_decay), lr=lr, momentum=args.momentum,
                                nesterov=args.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, steps, args.epochs, args.warmup_epochs, args.schedule, args.lr_steps, args.lr_gamma),
    )
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    start_epoch, best, best_epoch = 0, -1.0, -1
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        done = int(resume_ckpt["epoch"]) * steps
        if scheduler.last_epoch != done or any(b != lr for b in scheduler.base_lrs):
            # Another global batch (or data set size) than the checkpoint's:
            # its step count and peak lr mean other epochs and another lr
            # here. The schedule is one of epochs, so continue it from the
            # epochs done at this run's steps per epoch and peak lr (the
            # optimizer's momentum is kept).
            log.print(f"the checkpoint was trained with global batch "
                      f"{resume_ckpt.get('world_size', '?')} x {resume_ckpt.get('batch_size', '?')} "
                      f"({scheduler.last_epoch} steps, peak lr {scheduler.base_lrs[0]:.4g}); this run uses "
                      f"{global_batch}: the schedule continues at epoch {resume_ckpt['epoch']} with "
                      f"{steps} steps/epoch and peak lr {lr:.4g}")
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]
            scheduler.last_epoch = done
            factor = lr_factor(done, steps, args.epochs, args.warmup_epochs, args.schedule, args.lr_steps,
                               args.lr_gamma)
            for group in optimizer.param_groups:
                group["initial_lr"] = lr
                group["lr"] = lr * factor
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if scaler is not None and resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = int(resume_ckpt["epoch"])
        best, best_epoch = float(resume_ckpt.get("best_acc1", -1.0)), int(resume_ckpt.get("best_epoch", -1))
        log.print(f"resumed from {args.resume}: {start_epoch} epoch(s) done, best top1 {best:.3f}%")
        if start_epoch >= args.epochs:
            log.print(f"nothing to do: --epochs {args.epochs} already reached")

    train_model: nn.Module = raw_model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    log.print(f"global batch {global_batch} ({world} x {args.batch_size}), {steps} steps/epoch, peak lr {lr:.4g} "
              f"({args.schedule}, warm-up {args.warmup_epochs:g} epochs), amp {args.amp}"
              f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}")
    if output is None:
        log.print("no --output: nothing is saved")
    log.record("config", arch=args.arch, world_size=world, global_batch=global_batch, steps_per_epoch=steps,
               peak_lr=lr, start_epoch=start_epoch, device=str(device), args=vars(args))

    init_params = ({k: v.detach().cpu().clone() for k, v in raw_model.named_parameters()}
                   if args.debug_dump else None)
    history, t_run = [], time.perf_counter()
    last_val = None
    for epoch in range(start_epoch, args.epochs):
        seed = _epoch_seed(args.seed, epoch, rank)
        torch.manual_seed(seed)
        for g in data.loader_generators:
            g.manual_seed(seed)
        data.train_sampler.set_epoch(epoch)
        tr = train_one_epoch(train_model, data.train_loader, criterion, optimizer, scheduler, scaler, ctx, log,
                             epoch=epoch, epochs=args.epochs, steps=steps, print_freq=args.print_freq,
                             global_batch=global_batch)
        _sync_buffers(raw_model, distributed)
        val = evaluate(eval_model, data.val_loader, ctx, data.num_classes)
        last_val = val
        is_best = val["top1"] > best
        if is_best:
            best, best_epoch = val["top1"], epoch + 1
        rec = {"epoch": epoch + 1, "lr": tr["lr"], "train_loss": tr["loss"],
               "train_top1": tr["top1"], "images_per_s": tr["images_per_s"], "train_time_s": tr["time_s"],
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"], "best_top1": best}
        history.append(rec)
        log.print(f"epoch {epoch + 1}/{args.epochs} done: train loss {tr['loss']:.4f} top1 {tr['top1']:.2f}% | "
                  f"val loss {val['loss']:.4f} top1 {val['top1']:.2f}% top5 {val['top5']:.2f}% | "
                  f"{tr['images_per_s']:.1f} img/s | {format_duration(tr['time_s'])}"
                  f"{' | new best' if is_best else ''}")
        if output is not None and rank == 0:
            ckpt = _checkpoint(args, raw_model, optimizer, scheduler, scaler, epoch=epoch + 1, best=best,
                               best_epoch=best_epoch, global_step=scheduler.last_epoch, world_size=world,
                               batch=args.batch_size, classes=data.classes)
            atomic_save(ckpt, output / "checkpoint.pth")
            if is_best:
                atomic_save(ckpt, output / "model_best.pth")
        log.record("epoch", **rec)
        if stop_after is not None and epoch + 1 >= stop_after:
            break

    if args.debug_dump:
        dump = Path(args.debug_dump)
        dump.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": rank, "world_size": world, "indices": list(getattr(data.train_sampler, "seen", [])),
                    "init_params": init_params,
                    "params": {k: v.detach().cpu().clone() for k, v in raw_model.named_parameters()}},
                   dump / f"rank{rank}.pt")
    total = time.perf_counter() - t_run
    summary = {"mode": "train", "arch": args.arch, "epochs_run": len(history), "start_epoch": start_epoch,
               "history": history, "best_top1": best, "best_epoch": best_epoch, "val": last_val,
               "time_s": total, "world_size": world, "global_batch": global_batch,
               "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)) if history else None}
    if history:
        log.print(f"summary: {args.arch}, {len(history)} epoch(s) in {format_duration(total)}, "
                  f"mean {summary['images_per_s']:.1f} img/s ({world} x {args.batch_size}); last val top1 "
                  f"{last_val['top1']:.2f}% top5 {last_val['top5']:.2f}% loss {last_val['loss']:.4f}; best top1 "
                  f"{best:.2f}% (epoch {best_epoch})"
                  + (f"; saved {output / 'checkpoint.pth'}, {output / 'model_best.pth'}, {output / 'metrics.jsonl'}"
                     if output is not None else ""))
    log.record("summary", **{k: v for k, v in summary.items() if k not in ("history", "mode")})
    return summary


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point (``lip-train``): bad input exits with status 2 and
    a one-line message."""
    try:
        main(argv)
    except TrainConfigError as exc:
        print(f"lip_cuda.train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except ImportError as exc:
        print(f"lip_cuda.train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
