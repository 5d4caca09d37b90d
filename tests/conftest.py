import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def seed() -> int:
    """Fresh inputs every run; the seed is printed so a failure can be replayed."""
    value = int(os.environ.get("LIP_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    print(f"seed={value} (rerun with LIP_TEST_SEED={value})")
    return value
