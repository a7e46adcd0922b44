"""A tmpfs for the tests that need a real read-only or full filesystem (root only; skipped otherwise)."""
import contextlib
import gc
import subprocess

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount, options: str, why_skipped: str):
    """A tmpfs mounted at the new folder `mount` with `options` (e.g. "ro,size=1m") for the block; the test is
    skipped, saying `why_skipped`, where this process may not mount one."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip(why_skipped)
    try:
        yield mount
    finally:
        gc.collect()  # a failed torch.save's writer sits in a reference cycle that holds its file open
        subprocess.run(["umount", str(mount)], check=True)
