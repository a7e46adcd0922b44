"""bench/device_check.sh --small: the whole device check as a CPU dry run, as the device runs it (the package
assembled outside the repository, scripts run so that the repository's moca_fast cannot shadow it)."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"reference", "trainer", "trainer_zero0", "trainer_fast", "trainer_fast_zero0"}


def test_device_check_dry_run_reports_every_stage_from_the_assembled_package(tmp_path):
    out = tmp_path / "out"
    # the stages' time limits are the device's; here they only bound a hang, on a CPU shared with other work
    limits = dict.fromkeys(("ENV_S", "PROBE_S", "STEP_S", "KERNELS_S"), "1200")
    proc = subprocess.run(["bash", "bench/device_check.sh", "--small"], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600, env={**os.environ, **limits, "OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    env = json.loads((out / "env.json").read_text())
    imported = Path(env["moca_fast"]).resolve()
    assert ROOT not in imported.parents, f"the repository's moca_fast shadowed the assembled copy: {imported}"
    assert Path(env["moca_fast.kernels"]).resolve().parent.parent == imported.parent
    assert not imported.exists(), "the assembled copy is removed at the end"
    assert set(env["pieces"]) == {"deepspeed", "xformers", "dali", "apex", "nvjpeg (torchvision)", "triton"}
    assert all(s.startswith(("ok", "missing: ", "failed: ")) for s in env["pieces"].values()), env["pieces"]
    assert env["pieces"]["deepspeed"].startswith("ok") and env["pieces"]["triton"].startswith("ok")

    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert [s[0] for s in stages] == ["setup", "environment", "training_step", "kernels"]
    assert all(s[1] == "0" for s in stages), stages
    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["check"] and all(c["ok"] for c in kernels["check"].values())
    throughput = json.loads((out / "throughput.json").read_text())
    assert set(throughput["variants"]) == VARIANTS
    assert all(r["status"] == "ok" and r["img_per_s"] > 0 for r in throughput["variants"].values())

    # the report's order, the summary table last
    text = proc.stdout
    heads = ["== 1. environment", "== 2-3. fused ops", "== 4. training step", "== summary"]
    assert all(h in text for h in heads) and [text.index(h) for h in heads] == sorted(text.index(h) for h in heads)
    assert f"moca_fast: {env['moca_fast']}" in text
    assert text.rstrip().splitlines()[-1].startswith("step trainer_zero0")
