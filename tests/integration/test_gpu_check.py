"""``benchmarks/gpu_check.sh --cpu --tiny``: the accelerator check's smoke run on CPU (slow)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("S4_GPU_CHECK_TEST") != "1",
                    reason="opt-in (S4_GPU_CHECK_TEST=1): its speed stage exceeded its 300 s limit on 2 CPU cores")
def test_gpu_check_runs_on_cpu_tiny(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable)
  done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--tiny", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1800)
  summary = json.loads((tmp_path / "gpu_check.json").read_text())
  assert done.returncode == 0, (summary, done.stderr[-3000:])
  for stage in ("device", "tests", "speed", "precision_speed", "distributed"):
    assert summary["stages"][stage]["status"] == "ok", (stage, summary)
  speed = json.loads((tmp_path / "precision_speed.json").read_text())
  names = {"adamw"} | {f"{m}@{p}" for m in ("adamw_shampoo4", "soap4") for p in ("highest", "high", "default")}
  assert set(speed["results"]) == names
  assert all(r["median_s"] > 0 for r in speed["results"].values())
  if summary["stages"]["precision_train"]["status"] != "skipped":
    train = json.loads((tmp_path / "precision_train.json").read_text())
    assert {"adamw", "adamw+shampoo4_bf16", "soap4_bf16"} <= set(train["results"])
