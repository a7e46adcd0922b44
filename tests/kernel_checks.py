"""Shared by the kernel tests: a fresh random seed per test (printed, to replay a failure) and the
relative error used with the stated tolerances."""
import os

import torch


def fresh_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    torch.manual_seed(seed)
    return seed


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 (0 when both are all zeros)."""
    scale = expected.double().abs().max()
    diff = (actual.double() - expected.double()).abs().max()
    return 0.0 if scale == 0 and diff == 0 else (diff / scale).item()
