"""bench/dali_parts.sh: wheels packed into parts here, received one part per run on the "device" (another
folder, each part arriving in its own run), checked, joined and unpacked byte for byte; a damaged or missing
part is one line naming the run to resend."""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def parts_script(*args, cwd_env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "bench" / "dali_parts.sh"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **cwd_env})


@pytest.fixture
def packed(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, size in (("nvidia_dali_cuda130-2.4.0-py3-none-manylinux.whl", 300_000), ("nvtx-0.2.17.whl", 20_000)):
        (wheels / name).write_bytes(os.urandom(size))
    here = {"DALI_DIR": str(tmp_path / "here" / ".dali"), "WHL_DIR": str(tmp_path / "here" / ".whl"),
            "DALI_WHEELS_FROM": str(wheels), "PART_SIZE": "100K"}
    run = parts_script("pack", cwd_env=here)
    assert run.returncode == 0, run.stderr
    return tmp_path, wheels, Path(here["DALI_DIR"]), run.stdout


def device_env(tmp_path) -> dict:
    return {"DALI_DIR": str(tmp_path / "device" / ".dali"), "WHL_DIR": str(tmp_path / "device" / ".whl")}


def send(dali: Path, tmp_path: Path, k: int) -> None:
    shutil.copytree(dali / f"p{k}", tmp_path / "device" / ".dali" / f"p{k}")


def test_parts_sent_one_per_run_join_into_the_same_wheels(packed):
    tmp_path, wheels, dali, printed = packed
    count = len(list(dali.glob("p*")))
    assert count == 4  # 320 KB of wheels (+ tar headers) in 100 KiB parts
    assert all((dali / f"p{k}" / "part").stat().st_size <= 100 * 1024 for k in range(count))
    assert f'run {count - 1}: carry ["{dali}/p{count - 1}", ' in printed and "dali_parts.sh join" in printed
    device = device_env(tmp_path)
    for k in range(count - 1):
        send(dali, tmp_path, k)
        run = parts_script("check", str(k), cwd_env=device)
        assert run.returncode == 0 and run.stdout.strip() == f"part {k} of {count}: ok", run.stderr
    send(dali, tmp_path, count - 1)
    run = parts_script("join", cwd_env=device)
    assert run.returncode == 0, run.stderr
    for wheel in wheels.iterdir():
        joined = tmp_path / "device" / ".whl" / wheel.name
        assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(wheel.read_bytes()).digest()


def test_a_damaged_or_missing_part_names_the_run_to_resend(packed):
    tmp_path, _, dali, _ = packed
    device = device_env(tmp_path)
    run = parts_script("check", "0", cwd_env=device)
    assert run.returncode == 2 and run.stderr.strip().endswith("part 0 never arrived, resend run 0")
    for k in range(3):
        send(dali, tmp_path, k)
    part = tmp_path / "device" / ".dali" / "p1" / "part"
    data = part.read_bytes()  # its last byte changed: a zero written over it was no change 1 time in 256
    part.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    run = parts_script("join", cwd_env=device)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "part 1 damaged" in run.stderr and "resend run 1" in run.stderr
    shutil.copy(dali / "p1" / "part", part)
    run = parts_script("join", cwd_env=device)
    assert run.returncode == 2 and "part 3 missing" in run.stderr and "resend run 3" in run.stderr
