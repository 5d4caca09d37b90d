"""Checkpoints of ``lip_cuda.train``: written atomically, in the authors' format.

A checkpoint is a dict in the layout of the authors' ImageNet script (the
classic PyTorch example that ``sebgao/LIP`` ``imagenet/main.py`` is based
on): ``epoch`` (epochs completed, i.e. the next epoch to run), ``arch``,
``state_dict`` with the ``module.`` prefix that their DistributedDataParallel
model writes, ``best_acc1`` and ``optimizer``; so their script loads our
weights, and :func:`lip_cuda.models.convert_reference_state_dict` (which
strips the prefix) loads theirs and ours into a bare model. Our own keys
(``format``, ``scheduler``, ``scaler``, ``args``, ...) come on top.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from torch import nn

from ..models import convert_reference_state_dict
from .errors import TrainConfigError

__all__ = ["FORMAT", "atomic_save", "load_checkpoint", "reference_state_dict", "check_arch", "load_weights"]

FORMAT = "lip_cuda.train/1"


def atomic_save(obj: Any, path: os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder
    and a rename, so ``path`` always holds either the old or the new complete
    file, whenever the process dies.

    Example::

        >>> atomic_save({"epoch": 1}, "out/checkpoint.pth")   # doctest: +SKIP
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 keeps the usual umask-based permissions (mkstemp would give 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def reference_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """``model``'s state dict with every key prefixed ``module.``, as the
    authors' (Distributed)DataParallel training writes it."""
    return OrderedDict(("module." + k, v) for k, v in model.state_dict().items())


def load_checkpoint(path: str, what: str, trust: bool = False) -> Dict[str, Any]:
    """Read a checkpoint onto the CPU. ``what`` names the option in errors.

    Loads with ``weights_only=True`` (tensors and plain containers only)
    unless ``trust`` is set.
    """
    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"{what} {path}: no such file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        raise TrainConfigError(
            f"{what} {path}: refused by the safe loader (weights_only=True): {str(exc).splitlines()[0]}; "
            f"pass --trust-checkpoint if you trust this file"
        ) from exc
    except Exception as exc:  # truncated or not a torch file
        raise TrainConfigError(f"{what} {path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, Mapping):
        raise TrainConfigError(f"{what} {path}: holds a {type(ckpt).__name__}, not a state dict or checkpoint dict")
    return dict(ckpt)


def check_arch(ckpt: Mapping[str, Any], arch: str, path: str, what: str) -> None:
    """Refuse a checkpoint of ours saved for another arch. (The authors'
    checkpoints name the arch differently, so theirs are checked by keys in
    :func:`load_weights`.)"""
    if ckpt.get("format") == FORMAT and ckpt.get("arch") != arch:
        raise TrainConfigError(
            f"{what} {path} was saved for --arch {ckpt.get('arch')}, not --arch {arch}"
        )


def load_weights(model: nn.Module, ckpt: Mapping[str, Any], arch: str, path: str, what: str) -> None:
    """Load a checkpoint's weights (ours, the authors', or a bare state dict)
    into ``model`` strictly, or raise :class:`TrainConfigError` saying which
    keys or shapes do not fit."""
    check_arch(ckpt, arch, path, what)
    sd = convert_reference_state_dict(ckpt)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TrainConfigError(f"{what} {path}: found no state dict (a 'state_dict' entry or a dict of tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise TrainConfigError(
            f"{what} {path} does not fit --arch {arch}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}; was it saved for another architecture?"
        )
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if wrong:
        k, theirs, ours = wrong[0]
        hint = ""
        if k.endswith("fc.weight") or k.endswith("classifier.weight"):
            hint = f" (the checkpoint has {theirs[0]} classes, this run {ours[0]})"
        raise TrainConfigError(
            f"{what} {path} does not fit --arch {arch}: {len(wrong)} tensors differ in shape, "
            f"e.g. {k} {theirs} vs {ours}{hint}"
        )
    model.load_state_dict(sd, strict=True)
