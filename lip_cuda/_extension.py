"""Loads the compiled extension, which registers the torch.ops.lip_cuda operators."""
import torch  # noqa: F401  (loads libtorch and libc10, which _C links against)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "lip_cuda's compiled extension (lip_cuda._C) could not be imported: "
        f"{error}. Build it from the repository root with "
        "`pip install --no-build-isolation -e .` (torch must be installed first)."
    ) from error


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_C.WITH_CUDA)
