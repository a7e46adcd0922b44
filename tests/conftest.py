"""Test-session setup: Triton kernels run under the interpreter on this CPU-only suite (set before any test
module imports triton; torchvision imports it too), the scans' verdicts kept in a folder of this session (not
in the user's cache), and the one-rank process group of in-process trainer runs.
"""
import os

import pytest

from free_port import free_port

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def session_scan_cache(tmp_path_factory):
    """$MOCA_FAST_SCAN_CACHE of every scan of the session, in this process and the processes it starts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCA_FAST_SCAN_CACHE", str(tmp_path_factory.mktemp("scans")))
        yield


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

