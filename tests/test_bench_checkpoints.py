"""`python -m bench checkpoints --small`, as a user runs it: two gloo ranks write a tiny checkpoint and one rank
resumes from it; its JSON holds positive times and the checkpoint's bytes by kind (no optimizer_full.pt: the
optimiser state is in DeepSpeed's per-rank files only)."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_run_times_a_write_and_a_resume_on_another_number_of_ranks(tmp_path):
    out = tmp_path / "checkpoints.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "checkpoints", "--small", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-3000:])
    [row] = json.loads(out.read_text())["rows"]
    assert row["tree"] == "this" and row["preset"] == "tiny"
    assert Path(row["moca_fast"]) == ROOT / "moca_fast"
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("write_s", "resume_s"))
    assert row["bytes"]["optimizer_full"] == 0
    assert row["bytes"]["model_file"] > 0 and row["bytes"]["optimizer_files"] > 0
    assert "this       tiny" in proc.stdout.splitlines()[-1]
