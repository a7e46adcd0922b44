"""Test-session setup: Triton kernels run under the interpreter on this CPU-only suite.

Set before any test module imports triton (torchvision imports it too), so every kernel test sees it.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
