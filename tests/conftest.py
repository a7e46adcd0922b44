"""Test-session setup: Triton kernels run under the interpreter on this CPU-only suite (set before any test
module imports triton; torchvision imports it too), and the one-rank process group of in-process trainer runs.
"""
import os

import pytest

from free_port import free_port

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_process_group():
    """The variables of a one-rank process group, for the requesting module; the trainer (init_distributed)
    starts the group on first use. The group is never destroyed: DeepSpeed keeps the groups of the first one,
    so a second process group in this process would break every later in-process run."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())).items():
            mp.setenv(key, value)
        yield

