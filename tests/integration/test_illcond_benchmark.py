"""Smoke test of ``benchmarks/illcond.py`` and checks of its float64 optima."""

import json

import numpy as np

from benchmarks import illcond


def test_smoke_run_writes_table_json_and_png(tmp_path, capsys):
  out = tmp_path / "illcond.json"
  illcond.main(["--problems", "ls_power_1e2", "--rows", "adamw", "soap_ref", "--seeds", "0", "--steps", "10",
                "--lrs", "1e-2", "1e-1", "--out", str(out)])
  payload = json.loads(out.read_text())
  assert out.with_suffix(".png").stat().st_size > 0
  problem = payload["problems"]["ls_power_1e2"]
  assert set(problem["summary"]) == {"adamw", "soap_ref"}
  for summary in problem["summary"].values():
    assert len(summary["lrs"]) >= 2
    assert np.isfinite(summary["best_mean"]) and summary["best_mean"] >= 0.0  # f - f* of a float64 optimum
    assert summary["largest_stable_lr"] is not None
  assert "soap_ref" in capsys.readouterr().out


def test_least_squares_optimum_is_the_minimum_and_spectrum_has_the_condition_number():
  problem = illcond.make_ls("power", 1e6)(0)
  x = problem.data["x"]
  eig = np.linalg.eigvalsh(x.T @ x / len(x))
  np.testing.assert_allclose(eig.max() / eig.min(), 1e6, rtol=1e-3)
  w, *_ = np.linalg.lstsq(x, problem.data["y"], rcond=None)
  rng = np.random.default_rng(0)
  for _ in range(3):
    moved = {"w": w + 1e-3 * rng.normal(size=w.shape)}
    assert illcond._ls_loss(moved, problem.data, np) > problem.fstar


def test_logistic_optimum_is_stationary_and_below_nearby_points():
  problem = illcond.make_logreg("wine")(0)
  f0 = illcond._logreg_loss(problem.params0, problem.data, np)
  assert problem.fstar < f0
  # Gradient descent in float64 from zero never gets below the Newton solution's value.
  w = np.zeros_like(problem.params0["w"])
  x, onehot = problem.data["x"], problem.data["onehot"]
  for _ in range(200):
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= 1e-7 * (x.T @ (p - onehot) / len(x) + illcond.L2_LOGREG * w)
  assert illcond._logreg_loss({"w": w}, problem.data, np) >= problem.fstar - 1e-12


def test_float32_floor_is_float32_rounding_and_marks_the_headline():
  # f - f* of a float32 Newton iteration held at the optimum: positive (float32 cannot represent the float64
  # optimum) and of the order of float32 rounding of f*, eps32 * f* ~ 1e-7 * f* at most; a wrong optimum or
  # a diverging iteration would be many orders above it.
  _, fstar = illcond._ls_data("power", 1e2, 0)
  floor = illcond.float32_floor("power", 1e2, 0, steps=20)
  assert 0.0 < floor < 1e-7 * fstar
  summary = {"ds_fp32": {"best_mean": 2 * floor}, "ds_4bit": {"best_mean": 3 * floor}}
  at_floor = illcond.headline_table({"ls_power_1e2": {"metric": "f - f*", "summary": summary,
                                                      "float32_floor": [floor]}})
  assert "1.50× ‡" in at_floor and "float32 floor" in at_floor
  far = {"ds_fp32": {"best_mean": 1e3 * floor}, "ds_4bit": {"best_mean": 2e3 * floor}}
  assert "‡" not in illcond.headline_table({"ls_power_1e2": {"metric": "f - f*", "summary": far,
                                                             "float32_floor": [floor]}})
