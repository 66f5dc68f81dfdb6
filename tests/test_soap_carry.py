"""soap4's carry of Adam's moments into a refreshed 4-bit basis (``carry``), against float64 numpy.

At a refresh step the state's bases (4-bit rows with a 16-bit head and an 8-bit middle tier) are decoded
twice by the library: as each step uses them (tiers projected) and as the refresh rebuilds its statistic
from them (one Björck step per tier). From those decoded rows, the eigenvalues, the gradient and the
moments of the state before the step, float64 numpy redoes the step: Adam's moments in the old basis, the
sort, the fold :math:`A = \\beta V^\\top \\Lambda V + (1-\\beta) G G^\\top`, one QR step :math:`P =
\\mathrm{qr}(A V^\\top).Q` (signs with :math:`R_{ii} \\ge 0`) and the carry :math:`m \\leftarrow C_L m
C_R^\\top`, :math:`v \\leftarrow (C_L \\circ C_L) v (C_R \\circ C_R)^\\top`, with

* ``carry="refreshed"``: :math:`C = P^\\top R_{old}^\\top`, the refresh's own rotation;
* ``carry="decoded"``: :math:`C = R_{new} R_{old}^\\top`, the new basis as stored and decoded.

Tolerance: float32 products of order ≤ 16 and one QR of a well-conditioned matrix; the largest
error relative to the moment's largest entry was measured at 2.7e-7 (m) / 1.9e-7 (v) for either carry;
1e-5 leaves over 30x headroom, while the two carries differ by 6 % of it (the 4-bit rounding the decoded
carry holds).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import factors as fct

B1, B2, BETA_S, EVERY = 0.9, 0.95, 0.8, 3
SHAPE = (16, 12)
TOL = 1e-5


def _grads(step):
  """Gradients with a spread diagonal (distinct eigenvalues: a well-conditioned QR step)."""
  rng = np.random.default_rng(step)
  g = rng.standard_normal(SHAPE)
  g[np.arange(12), np.arange(12)] += np.linspace(2.0, 8.0, 12)
  return {"w": jnp.asarray(g, jnp.float32)}


def _run(carry):
  tx = s4.scale_by_soap4(B1, B2, 1e-8, shampoo_beta=BETA_S, precondition_every=EVERY, min_quant_order=8,
                         quant_block=4, carry=carry)
  params = {"w": jnp.zeros(SHAPE)}
  state, update = tx.init(params), jax.jit(tx.update)
  for call in range(1, EVERY + 1):  # calls 1..3; call 4 (Adam step 3) refreshes
    _, state = update(_grads(call), state, params)
  _, after = update(_grads(EVERY + 1), state, params)
  return state, after


def _rows(bucket, refresh):
  """The library's two decodings of a stored basis (rows), float64."""
  if refresh:
    rows = fct.rectified(bucket.eigvecs, 1, tail_qr=False)
  else:
    rows = fct.rectified(bucket.eigvecs, 0, tail_steps=0, always_project=True)
  return np.asarray(rows, np.float64)[0]


def _qr_refresh(rows, eigvals, gram):
  order = np.argsort(-eigvals, kind="stable")
  rows, eigvals = rows[order], eigvals[order]
  a = BETA_S * rows.T @ np.diag(eigvals) @ rows + (1 - BETA_S) * gram
  q, r = np.linalg.qr(a @ rows.T)
  return (q * np.where(np.diag(r) < 0, -1.0, 1.0)).T


def _expected(state, after, carry):
  """Float64 ``(m, v)`` after the refresh step from ``state``; ``after`` only for the decoded new basis."""
  g = np.asarray(_grads(EVERY + 1)["w"], np.float64)
  sides = [state.factors[f"order{n}_q"] for n in SHAPE]
  old = [_rows(b, refresh=False) for b in sides]
  gp = old[0] @ g @ old[1].T
  m = B1 * np.asarray(state.mu["w"], np.float64) + (1 - B1) * gp
  v = B2 * np.asarray(state.nu["w"], np.float64) + (1 - B2) * gp**2
  if carry == "refreshed":
    grams = (g @ g.T, g.T @ g)
    new = [_qr_refresh(_rows(b, refresh=True), np.asarray(b.eigvals, np.float64)[0], gram)
           for b, gram in zip(sides, grams)]
  else:
    new = [_rows(after.factors[f"order{n}_q"], refresh=False) for n in SHAPE]
  cl, cr = (n @ o.T for n, o in zip(new, old))
  return cl @ m @ cr.T, (cl * cl) @ v @ (cr * cr).T


@pytest.fixture(scope="module")
def runs():
  """``runs(carry)``: the run of that carry, made once (the refreshed one only in the slow run, ~13 s)."""
  return functools.cache(_run)


@pytest.mark.parametrize("carry", [pytest.param("refreshed", marks=pytest.mark.slow), "decoded"])
def test_moments_carried_as_float64_numpy_carries_them(runs, carry):
  state, after = runs(carry)
  assert isinstance(state.factors["order16_q"].eigvecs, s4.SplitRowsQuantized)
  assert int(after.failed_refreshes) == 0
  m, v = _expected(state, after, carry)
  np.testing.assert_allclose(np.asarray(after.mu["w"]), m, rtol=0, atol=TOL * np.abs(m).max())
  np.testing.assert_allclose(np.asarray(after.nu["w"]), v, rtol=0, atol=TOL * np.abs(v).max())


@pytest.mark.slow
def test_the_two_carries_differ_by_the_basis_rounding(runs):
  """From one state, the decoded carry moves m by far more than the tolerance (the 4-bit rounding)."""
  state, after = runs("refreshed")
  m_refreshed, _ = _expected(state, after, "refreshed")
  m_decoded, _ = _expected(state, after, "decoded")
  gap = np.abs(m_refreshed - m_decoded).max() / np.abs(m_refreshed).max()
  assert gap > 100 * TOL, gap


def test_unquantized_bases_carry_alike():
  """With float32 bases the refresh's eigenvectors are the stored ones: both carries give the same moments."""
  def run(carry):
    tx = s4.scale_by_soap4(B1, B2, 1e-8, shampoo_beta=BETA_S, precondition_every=EVERY, state_format="fp32",
                           carry=carry)
    params = {"w": jnp.zeros(SHAPE)}
    state, update = tx.init(params), jax.jit(tx.update)
    for call in range(1, 2 * EVERY + 2):
      _, state = update(_grads(call), state, params)
    return state
  refreshed, decoded = run("refreshed"), run("decoded")
  np.testing.assert_array_equal(np.asarray(refreshed.mu["w"]), np.asarray(decoded.mu["w"]))


def test_carry_rejects_unknown_values():
  with pytest.raises(ValueError, match="carry"):
    s4.scale_by_soap4(carry="rounded")
