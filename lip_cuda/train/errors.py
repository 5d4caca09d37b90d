"""Errors raised for bad input, and the lazy torchvision import."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["TrainConfigError", "require_torchvision"]

INSTALL_HINT = "pip install lip_cuda[train]"


class TrainConfigError(ValueError):
    """A bad argument, data folder or checkpoint, found before training starts.

    The command line prints the message and exits with status 2.
    """


def require_torchvision(what: str) -> ModuleType:
    """Import torchvision (with ``datasets``, ``transforms``, ``models``) or
    raise an ImportError that names the extra to install.

    Example::

        >>> tv = require_torchvision("--data")   # doctest: +SKIP
        >>> tv.datasets.ImageFolder              # doctest: +SKIP
    """
    try:
        tv = importlib.import_module("torchvision")
        for sub in ("datasets", "transforms", "models"):
            importlib.import_module(f"torchvision.{sub}")
    except ImportError as exc:
        raise ImportError(
            f"{what} needs torchvision, which is not installed: {INSTALL_HINT} "
            f"(or pip install torchvision); --synthetic runs of the LIP archs work without it"
        ) from exc
    return tv
