"""Test-session setup: Triton kernels run under the interpreter on this CPU-only suite (set before any test
module imports triton; torchvision imports it too), the scans' verdicts kept in a folder of this session (not
in the user's cache), the logging set-up of each test undone after it, and the one-rank process group of in-process
trainer runs.
"""
import contextlib
import logging
import os

import pytest

from moca_fast.distributed import free_port

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def session_scan_cache(tmp_path_factory):
    """$MOCA_FAST_SCAN_CACHE of every scan of the session, in this process and the processes it starts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCA_FAST_SCAN_CACHE", str(tmp_path_factory.mktemp("scans")))
        yield


@contextlib.contextmanager
def _logging_restored():
    """What an in-process run sets up in logging (setup_logging: the root at INFO on rank 0, its own handler;
    DeepSpeed's logger) undone on exit, so that it does not reach the tests after it. pytest's own capture
    handlers, which it adds and removes around each phase, are left to pytest."""
    root, deepspeed = logging.getLogger(), logging.getLogger("DeepSpeed")
    root_level, root_handlers = root.level, set(root.handlers)
    deepspeed_state = deepspeed.level, list(deepspeed.handlers), deepspeed.propagate
    yield
    root.setLevel(root_level)
    for handler in [h for h in root.handlers if h not in root_handlers]:
        if not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    deepspeed.setLevel(deepspeed_state[0])
    deepspeed.handlers[:], deepspeed.propagate = deepspeed_state[1:]


@pytest.fixture(autouse=True)
def logging_of_the_test():
    with _logging_restored():
        yield


@pytest.fixture(scope="module", autouse=True)
def logging_of_the_module():
    """The same around a module: its module-scoped fixtures (an in-process run shared by its tests) start first."""
    with _logging_restored():
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

