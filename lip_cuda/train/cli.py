"""Command-line arguments of ``lip_cuda.train`` and their checks."""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

from .errors import TrainConfigError

__all__ = ["build_parser", "parse_args", "resolve_batch_size"]

EXAMPLES = """\
examples:
  # one process (GPU if visible), ImageNet layout DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG
  python -m lip_cuda.train --data /data/imagenet --arch lip_resnet50 --epochs 90 \\
      --batch-size 64 --amp bf16 --channels-last --output runs/lip50
  # 8 GPUs on one node (DistributedDataParallel, NCCL); --batch-size is per process
  torchrun --nproc-per-node 8 -m lip_cuda.train --data /data/imagenet --output runs/lip50
  # continue a run, or evaluate weights (ours or the authors')
  python -m lip_cuda.train --data /data/imagenet --resume runs/lip50/checkpoint.pth --output runs/lip50
  python -m lip_cuda.train --data /data/imagenet --evaluate --weights lip_resnet-50.pth
  # throughput without data: fused vs reference LIP
  python -m lip_cuda.train --synthetic 2560 --epochs 1 --lip-backend reference
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lip_cuda.train",
        description="Train or evaluate LIP networks (one process, or many with torchrun).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="folder with train/ and val/ class folders (torchvision ImageFolder)")
    src.add_argument("--synthetic", metavar="N", type=int,
                     help="N random training images made on the fly (no files), for smoke tests and throughput")
    d.add_argument("--synthetic-val", metavar="N", type=int, default=None,
                   help="synthetic validation images (default: N/4, at least 1)")
    d.add_argument("--num-classes", type=int, default=None,
                   help="classes (default: the folder's classes, 1000 for --synthetic)")
    d.add_argument("--image-size", type=int, default=224, help="training crop and validation crop size (default 224)")
    d.add_argument("--workers", "-j", type=int, default=None,
                   help="data-loading processes per training process (default: min(4, CPUs); 0 for --synthetic on the CPU)")

    m = p.add_argument_group("model")
    m.add_argument("--arch", "-a", default="lip_resnet50",
                   help="lip_resnet50 (default), lip_resnet101, lip_resnet152, lip_densenet121 when lip_cuda.models "
                        "has it, resnet50 (torchvision, no LIP), lip_smoke (tiny, for tests)")
    m.add_argument("--lip-backend", choices=["fused", "reference"], default="fused",
                   help="LIP op: the fused kernels (default) or the plain PyTorch formula, for comparison")
    m.add_argument("--weights", metavar="PATH",
                   help="start from these weights (a checkpoint of ours, of the authors, or a state dict)")
    m.add_argument("--trust-checkpoint", action="store_true",
                   help="load --weights/--resume with full unpickling (only for files you trust)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=90)
    bs = o.add_mutually_exclusive_group()
    bs.add_argument("--batch-size", "-b", type=int, default=None, help="images per process per step (default 64)")
    bs.add_argument("--global-batch-size", type=int, default=None,
                    help="images per step over all processes; must divide by the number of processes")
    o.add_argument("--lr", type=float, default=0.1,
                   help="peak learning rate for a global batch of --lr-base-batch; scaled linearly (default 0.1)")
    o.add_argument("--lr-base-batch", type=int, default=256, help="global batch that --lr refers to (default 256)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--nesterov", action="store_true")
    o.add_argument("--weight-decay", "--wd", type=float, default=1e-4, help="on conv/linear weights only (default 1e-4)")
    o.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    o.add_argument("--lr-steps", type=int, nargs="+", default=[30, 60, 80], metavar="EPOCH",
                   help="step schedule: epochs at which the lr is multiplied by --lr-gamma (default 30 60 80)")
    o.add_argument("--lr-gamma", type=float, default=0.1)
    o.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear warm-up epochs (default 0; about 5 suits large global batches)")
    o.add_argument("--label-smoothing", type=float, default=0.0)

    s = p.add_argument_group("speed")
    s.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast dtype (fp16 uses a gradient scaler)")
    s.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the GPU of this process's LOCAL_RANK if CUDA is available, else the CPU")

    r = p.add_argument_group("run")
    r.add_argument("--output", "-o", metavar="DIR",
                   help="write checkpoint.pth, model_best.pth and metrics.jsonl here (rank 0 only)")
    r.add_argument("--resume", metavar="PATH", help="continue from a checkpoint.pth of this tool")
    r.add_argument("--evaluate", "-e", action="store_true", help="only evaluate --weights (or --resume) on val")
    r.add_argument("--print-freq", "-p", type=int, default=50, help="progress line every N steps (default 50)")
    r.add_argument("--seed", type=int, default=0, help="seed for weights, data order and augmentation (default 0)")
    # For the tests: every rank dumps the sample indices it trained on and
    # its final parameters into this folder.
    r.add_argument("--debug-dump", metavar="DIR", help=argparse.SUPPRESS)
    return p


def _positive(name: str, value: Optional[float]) -> None:
    if value is not None and value <= 0:
        raise TrainConfigError(f"{name} must be positive, got {value}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the arguments that do not depend on the data or on
    the number of processes.

    Example::

        >>> args = parse_args(["--synthetic", "64", "--arch", "lip_smoke"])
        >>> args.num_classes, args.synthetic_val
        (1000, 16)
    """
    args = build_parser().parse_args(argv)
    for name in ("synthetic", "synthetic_val", "num_classes", "image_size", "epochs", "batch_size",
                 "global_batch_size", "lr", "lr_base_batch", "print_freq"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.workers is not None and args.workers < 0:
        raise TrainConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.synthetic is not None:
        if args.num_classes is None:
            args.num_classes = 1000
        if args.synthetic_val is None:
            args.synthetic_val = max(1, args.synthetic // 4)
    elif args.synthetic_val is not None:
        raise TrainConfigError("--synthetic-val goes with --synthetic, not --data")
    if args.evaluate:
        if not (args.weights or args.resume):
            raise TrainConfigError("--evaluate needs --weights PATH (or --resume PATH) to evaluate")
    elif args.weights and args.resume:
        raise TrainConfigError("give --weights (start of a new run) or --resume (continue a run), not both")
    if not args.evaluate and args.warmup_epochs >= args.epochs and args.warmup_epochs > 0:
        raise TrainConfigError(f"--warmup-epochs {args.warmup_epochs} must be less than --epochs {args.epochs}")
    if args.warmup_epochs < 0 or not 0 <= args.label_smoothing < 1 or args.weight_decay < 0:
        raise TrainConfigError("--warmup-epochs, --weight-decay must be >= 0 and --label-smoothing in [0, 1)")
    if not 0 <= args.momentum < 1:
        raise TrainConfigError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not args.lr_gamma > 0:
        raise TrainConfigError(f"--lr-gamma must be > 0, got {args.lr_gamma}")
    if any(m < 1 for m in args.lr_steps):
        raise TrainConfigError(f"--lr-steps must be epochs >= 1, got {args.lr_steps}")
    if args.nesterov and args.momentum == 0:
        raise TrainConfigError("--nesterov needs --momentum > 0")
    if args.schedule == "step" and sorted(args.lr_steps) != list(args.lr_steps):
        raise TrainConfigError(f"--lr-steps must be increasing, got {args.lr_steps}")
    return args


def resolve_batch_size(args: argparse.Namespace, world_size: int) -> int:
    """Images per process: ``--batch-size``, or ``--global-batch-size`` split
    over ``world_size`` processes (which it must divide). Default 64.

    Example::

        >>> ns = argparse.Namespace(batch_size=None, global_batch_size=256)
        >>> resolve_batch_size(ns, 8)
        32
    """
    if args.global_batch_size is not None:
        if args.global_batch_size % world_size:
            raise TrainConfigError(
                f"--global-batch-size {args.global_batch_size} does not divide over {world_size} processes "
                f"(use a multiple of {world_size}, or --batch-size per process)"
            )
        return args.global_batch_size // world_size
    return args.batch_size if args.batch_size is not None else 64
