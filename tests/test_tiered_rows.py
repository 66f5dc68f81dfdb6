"""Products with a tiered basis (:mod:`optax_shampoo4.tiered_rows`) against float64 numpy, and the step's use of them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import haar

import optax_shampoo4 as s4
from benchmarks.hlo_flops import dot_flops
from optax_shampoo4 import tiered_rows

EPS32 = float(np.finfo(np.float32).eps)


def _tiered(n: int, k: int, seed: int):
  """A rectified head ``D`` (k rows) and a perturbed tail ``T`` (as 4-bit rows are), float64 and float32."""
  rng = np.random.default_rng(seed)
  rows = haar(n, rng).T + 0.02 * rng.standard_normal((n, n)) / np.sqrt(n)
  head = np.linalg.qr(rows[:k].T)[0].T
  tail = rows[k:]
  formed = np.concatenate([head, tail - (tail @ head.T) @ head])
  return formed, tiered_rows.TieredRows(jnp.asarray(head, jnp.float32), jnp.asarray(tail, jnp.float32))


def _tolerance(n: int, x: np.ndarray) -> float:
  # Each output entry is a length-n dot of unit-norm rows with x (|.|_2 <= sqrt(n) max|x|), at most three
  # products chained: 3 * n * eps * sqrt(n) * max|x| bounds the float32 error.
  return 3 * n * EPS32 * np.sqrt(n) * np.abs(x).max()


@pytest.mark.parametrize("other", [8, 40, 200])  # below and above t = 48: the operand projected, or R formed
def test_products_equal_those_of_the_formed_rows(other):
  n, k = 64, 16
  formed, rows = _tiered(n, k, seed=other)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((n, other))
  y = rng.standard_normal((other, n))
  cases = {
      "R X": (tiered_rows.rows_times(rows, jnp.asarray(x, jnp.float32), "highest"), formed @ x),
      "R^T X": (tiered_rows.rows_transposed_times(rows, jnp.asarray(x, jnp.float32), "highest"), formed.T @ x),
      "Y R^T": (tiered_rows.times_rows_transposed(jnp.asarray(y, jnp.float32), rows, "highest"), y @ formed.T),
      "Y R": (tiered_rows.times_rows(jnp.asarray(y, jnp.float32), rows, "highest"), y @ formed),
  }
  for name, (got, want) in cases.items():
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=_tolerance(n, x), err_msg=name)


def test_as_matrix_projects_the_tail_out_of_the_head():
  formed, rows = _tiered(64, 16, seed=3)
  got = np.asarray(tiered_rows.as_matrix(rows), np.float64)
  np.testing.assert_allclose(got, formed, rtol=0, atol=_tolerance(64, formed))
  np.testing.assert_allclose(got[16:] @ got[:16].T, 0.0, atol=_tolerance(64, formed))
  plain = jnp.ones((3, 4, 4))
  assert tiered_rows.as_matrix(plain) is plain


def test_rows_stay_tiered_only_where_every_product_projects_its_operand():
  _, rows = _tiered(64, 16, seed=4)  # t = 48
  assert isinstance(tiered_rows.for_products(rows, [8, 47]), tiered_rows.TieredRows)
  assert not isinstance(tiered_rows.for_products(rows, [8, 48]), tiered_rows.TieredRows)
  assert tiered_rows.for_products(rows, []) is rows


def _soap(**kw):
  return optax.chain(s4.scale_by_soap4(min_quant_order=16, quant_block=16, precondition_every=3, **kw),
                     optax.scale_by_learning_rate(1e-2))


@pytest.mark.slow  # ~10 s on 2 cores (a SOAP compilation); keeps the default run under its 10 minutes
def test_a_narrow_block_projects_its_gradient_not_its_basis():
  """The every-step dot flops of a (32, 256) leaf from the compiled step: the 256-order basis (t = 192 4-bit rows,
  k = 64 more precise ones: 32 in 16 bits, 32 in 8 bits) is not formed (4tkn = 12.6M flops per step); the
  gradient is projected instead (4mkn = 2.1M), next to the rotations' 9.4M."""
  m, n = 32, 256
  params = {"w": jnp.zeros((m, n))}
  grads = {"w": jnp.ones((m, n))}

  state = _soap().init(params)
  tiered = dot_flops(jax.jit(_soap().update).lower(grads, state, params).compile().as_text())["every_call"]
  rotations = 2 * (2 * m * m * n + 2 * m * n * n)  # forward and back: all a float32 basis's step computes
  t, k = 3 * n // 4, n // 4
  heads = 4 * (n // 8) ** 2 * n + 4 * 4 * 4 * m  # the 8-bit rows projected out of the 16-bit ones (both bases)
  assert rotations < tiered <= rotations + 1.01 * (4 * m * k * n + heads + 4 * 24 * 8 * m)  # + the 32-order basis formed
  assert tiered - rotations < 4 * t * k * n / 2


@pytest.mark.slow  # ~60 s on 2 cores (two SOAP compilations)
def test_soap_steps_with_tiered_rows_match_the_formed_basis(monkeypatch):
  """Twenty steps of ``soap4`` on narrow and square leaves equal the same steps with every basis formed."""
  from optax_shampoo4 import soap_eigenbasis

  params = {"narrow": jnp.zeros((24, 128)), "square": jnp.zeros((64, 64)), "tall": jnp.zeros((160, 16))}
  keys = jax.random.split(jax.random.PRNGKey(0), 20)
  grads = [jax.tree.map(lambda p, kk=kk: jax.random.normal(kk, p.shape), params) for kk in keys]

  def run():
    tx = _soap()
    state, updates = tx.init(params), []
    step = jax.jit(tx.update)
    for g in grads:
      u, state = step(g, state, params)
      updates.append(u)
    return updates

  tiered = run()
  monkeypatch.setattr(soap_eigenbasis.tiered_rows, "for_products", lambda rows, others: tiered_rows.as_matrix(rows))
  formed = run()
  for step, (a, b) in enumerate(zip(tiered, formed)):
    for name in params:
      scale = float(jnp.abs(b[name]).max())
      np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-3 * scale, err_msg=f"step {step} {name}")
