"""`python -m bench`, the benchmarks' one front door: it lists every sub-command with its question, each
sub-command runs its file (its own --help), every file of bench/ is a sub-command or a shared piece the listing
names, and a wrong sub-command or argument is one line and exit 2. The sub-commands' own runs are tested in
test_bench_e2e.py, test_estimate.py, test_fast_vs_reference.py, test_device_check.py, test_kernel_compile.py."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from bench.__main__ import COMMANDS  # noqa: E402


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args", [(), ("--help",), ("-h",)])
def test_listing_names_every_sub_command_with_its_question(args):
    proc = _bench(*args)
    assert proc.returncode == 0, proc.stderr
    for name, (_, question) in COMMANDS.items():
        assert f"  {name}  " in proc.stdout and question in proc.stdout, name


def test_every_file_is_a_sub_command_or_a_named_shared_piece():
    listing = _bench().stdout
    files = {p.name for p in (ROOT / "bench").iterdir() if p.suffix in (".py", ".sh") and p.name != "__main__.py"}
    commands = {script for script, _ in COMMANDS.values()}
    assert commands <= files
    assert all(f in listing for f in files - commands), sorted(f for f in files - commands if f not in listing)


@pytest.mark.parametrize("name", [n for n, (script, _) in COMMANDS.items() if script.endswith(".py")])
def test_sub_command_help_is_its_files_own(name):
    proc = _bench(name, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ") and COMMANDS[name][0] in proc.stdout.splitlines()[0]


def test_unknown_sub_command_is_one_line_and_exit_2():
    proc = _bench("nonsense")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "'nonsense'" in proc.stderr


def test_device_check_rejects_an_unknown_argument_in_one_line():
    proc = _bench("device-check", "--bogus", timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("bench/device_check.sh: unknown argument '--bogus' "
                                   "(expected --wheels, --small or nothing)")
