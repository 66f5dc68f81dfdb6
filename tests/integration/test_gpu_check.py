"""``benchmarks/gpu_check.sh --cpu --tiny``: the accelerator check's smoke run on CPU (slow run).

Every stage must finish within its limit (``timeout`` exits 124, recorded as "timeout") with status 0, and the
precision stages must write their rows: the optimizer step at each precision against ``optax.adamw``, and the
transformer example trained with each precision of 4-bit Shampoo and 4-bit SOAP.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STAGES = ("device", "tests", "speed", "quality", "precision_speed", "precision_train", "distributed")
PRECISIONS = ("highest", "high", "default")
SUFFIXES = ("", "_bf16x3", "_bf16")  # examples/variants.py's names of the three precisions


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_tiny(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable)
  done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--tiny", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=3000)  # > the sum of the stages' limits (2850 s)
  summary = json.loads((tmp_path / "gpu_check.json").read_text())
  assert done.returncode == 0, (summary, done.stderr[-3000:])
  assert summary["cpu_mode"] and summary["size"] == "tiny"
  assert set(summary["stages"]) == set(STAGES), summary  # flax and tqdm are test dependencies: nothing skipped
  for stage in STAGES:
    assert summary["stages"][stage]["status"] == "ok", (stage, summary)
    assert summary["stages"][stage]["cpu_seconds"] > 0, (stage, summary)  # each stage runs Python

  speed = json.loads((tmp_path / "precision_speed.json").read_text())
  names = {"adamw"} | {f"{m}@{p}" for m in ("adamw_shampoo4", "soap4") for p in PRECISIONS}
  assert set(speed["results"]) == names
  assert all(r["median_s"] > 0 for r in speed["results"].values())

  train = json.loads((tmp_path / "precision_train.json").read_text())["results"]
  optimizers = {"adamw"} | {f"{m}{s}" for m in ("adamw+shampoo4", "soap4") for s in SUFFIXES}
  assert set(train) == optimizers
  losses = {name: r["final_train_loss"] for name, r in train.items()}  # a non-finite loss is written as null
  assert all(loss is not None and math.isfinite(loss) for loss in losses.values()), losses
