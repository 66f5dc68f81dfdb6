"""``benchmarks/soap_window.py``: its statistic ladder against the float64 transcription of the authors' SOAP.

The ``carried`` variant keeps the reference's statistic in the current basis
(diagonal plus carried off-diagonal part), so it must equal the transcription
step for step; the variants below it drop part of the statistic and must not.
Tolerance as ``tests/integration/test_reference_algorithms.py``: float32
against float64, largest parameter deviation relative to the reference's
displacement; each step carries the float32 error of a few 8x8 products, one
QR / eigh of a well-conditioned 8x8 matrix (O(n u kappa) ~ 1e-5) and Adam's
division, observed 2.5e-6 over 60 steps, so 1e-3 keeps >= 100x headroom, while
a dropped off-diagonal part moves the parameters by O(1e-2..1) (observed 0.055 to 0.2).
"""

import numpy as np
import optax
import pytest
import reference_soap as soap
import reference_twins as twins

from benchmarks import soap_window

STEPS = 60
LR = 1e-2
EVERY = 5


def _batches(n_in, n_out, steps=STEPS, batch=32, seed=0):
  return twins.regression_batches(n_in, n_out, steps, batch, seed)


def _loss(params, batch):
  return 0.5 * ((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2).mean()


def _grad64(batches):
  def grad(params, call):
    x, y = batches["x"][call], batches["y"][call]
    residual = x @ params["w"] + params["b"] - y
    scale = 1.0 / residual.size
    return {"w": x.T @ residual * scale, "b": residual.sum(0) * scale}
  return grad


def _deviation(variant):
  batches = _batches(8, 8)
  # Square weight: both factors are full rank from the first gradient (the first eigh basis is unique).
  params0 = {"w": np.random.default_rng(9).normal(size=(8, 8)) * 0.1, "b": np.zeros(8)}
  cfg = soap.SoapConfig(lr=LR, weight_decay=0.0, precondition_frequency=EVERY)
  history = soap.run_soap(params0, _grad64(batches), STEPS, cfg)
  opt = optax.chain(soap_window.scale_by_soap_window(variant, every=EVERY), optax.scale(-LR))
  return twins.max_relative_deviation(opt, history, params0, _loss, batches)


def test_carried_statistic_equals_the_authors_soap_step_for_step():
  deviation = _deviation("carried")
  assert deviation[1:].max() < 1e-3, deviation


@pytest.mark.parametrize("variant", ["refresh", "corrected", "window"])
def test_variants_that_drop_part_of_the_statistic_deviate(variant):
  # Each drops a part of the reference's statistic (every gradient's off-diagonal part, or what a power
  # step leaves off the diagonal); the comparison above must be able to tell.
  deviation = _deviation(variant)
  assert deviation.max() > 1e-2, deviation
