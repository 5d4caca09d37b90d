"""Train and evaluate LIP networks: ``python -m lip_cuda.train`` (or ``lip-train``).

One process, or many with ``torchrun`` (DistributedDataParallel; NCCL on
GPUs, gloo on the CPU). ``python -m lip_cuda.train --help`` lists the
options; the README's "Train and evaluate" section has the commands.

    >>> from lip_cuda.train import main
    >>> summary = main(["--synthetic", "64", "--arch", "lip_smoke", "--image-size", "32",
    ...                 "--num-classes", "10", "--batch-size", "8", "--epochs", "1"])  # doctest: +SKIP

torchvision (ImageFolder, transforms, the ResNet-50 baseline) is optional:
``pip install lip_cuda[train]``.
"""
from .archs import available_archs, build_model
from .cli import build_parser, parse_args
from .errors import TrainConfigError
from .run import cli, main

__all__ = ["main", "cli", "build_parser", "parse_args", "available_archs", "build_model", "TrainConfigError"]
