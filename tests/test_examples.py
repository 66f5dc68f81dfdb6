"""Smoke test of the quickstart demo (``examples/quickstart.py``)."""

import importlib.util
import json
import math
import pathlib

import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

QUICKSTART = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def _load_quickstart():
  spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quickstart_trains_and_4bit_state_is_smaller(tmp_path, capsys):
  quickstart = _load_quickstart()
  out = tmp_path / "losses.json"
  # 40 steps: four statistics and two root refreshes (T1=10, T2=20), so the
  # preconditioned (and, for shampoo4, quantized) path really runs.
  results = quickstart.main(["--steps", "40", "--seed", "1", "--out", str(out)])

  assert set(results) == {"adamw", "shampoo32", "shampoo4"}
  for name, r in results.items():
    losses = r["losses"]
    assert len(losses) == 40
    assert all(math.isfinite(x) for x in losses), name
    assert math.isfinite(r["test_loss"]), name
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), name  # the loss went down
    assert r["test_accuracy"] > 0.8, name

  precond32 = results["shampoo32"]["state_bytes"]["preconditioner"]
  precond4 = results["shampoo4"]["state_bytes"]["preconditioner"]
  assert results["adamw"]["state_bytes"]["preconditioner"] == 0
  assert results["shampoo4"]["state_bytes"]["quantized_codes"] > 0
  assert results["shampoo32"]["state_bytes"]["quantized_codes"] == 0
  assert precond4 < 0.25 * precond32

  assert json.loads(out.read_text())["results"]["shampoo4"]["losses"] == results["shampoo4"]["losses"]
  printed = capsys.readouterr().out
  assert "4-bit / 32-bit" in printed
