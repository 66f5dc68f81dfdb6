"""Tests for the float32 matrix functions (``optax_shampoo4.linalg``).

References are computed in float64 NumPy (``np.linalg.eigh``, ``svd``) from the
exact float32 inputs that the library sees.
"""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import haar, polar64, spd, sweep

from optax_shampoo4 import linalg as la
from optax_shampoo4 import quantization as qz

EPS32 = float(np.finfo(np.float32).eps)

# Compiled once per shape and static arguments (cheaper than op-by-op dispatch).
_bjorck = jax.jit(la.bjorck, static_argnames="steps")
_qr_refresh = jax.jit(la.qr_refresh, static_argnames="iterations")
_eigh = jax.jit(la.eigh_descending)
_eigh_where = jax.jit(la.eigh_where)






def _orth_error(v):
  """‖V Vᵀ − I‖_F in float64."""
  v = np.asarray(v, np.float64)
  return np.linalg.norm(v @ v.T - np.eye(v.shape[-1]))


def _orth_bound(n):
  """Householder QR's float32 loss of orthogonality: ‖QᵀQ − I‖₂ <= n eps (Higham, Thm 19.4, constant 1),
  so ‖QᵀQ − I‖_F <= n^1.5 eps."""
  return n**1.5 * EPS32



# ----------------------------------------------------------------------------
# Björck orthonormalization.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["linear2", "dynamic_tree"])
@sweep(0)
def test_bjorck_converges_from_4bit_haar(mapping, seed):
  n = 256
  u = haar(n, np.random.default_rng(seed))
  v = qz.dequantize(qz.quantize(jnp.asarray(u, jnp.float32), mapping, 4, 64))
  polar = polar64(v)
  iterates = [v]
  for _ in range(4):
    iterates.append(_bjorck(iterates[-1], steps=1))
  errors = [_orth_error(w) for w in iterates]
  # 4-bit storage destroys orthogonality (reference §3.5: 0.15 / 0.20 per √n).
  assert errors[0] / np.sqrt(n) > 0.1, errors
  for k in range(3):
    assert errors[k + 1] < 0.25 * errors[k], errors  # a large factor per step
    assert errors[k + 1] < errors[k] ** 2, errors  # quadratic convergence
  assert errors[4] / np.sqrt(n) < 1e-5, errors
  # steps=4 is four single steps, and it converges to the polar factor (the
  # nearest orthogonal matrix), not just to some orthogonal matrix.
  w4 = _bjorck(v, steps=4)
  chex.assert_shape(w4, (n, n))
  chex.assert_type(w4, jnp.float32)
  chex.assert_trees_all_close(w4, iterates[4], atol=1e-6)
  assert np.linalg.norm(np.asarray(w4, np.float64) - polar) / np.sqrt(n) < 1e-5


def test_bjorck_small_example_matches_polar_factor():
  v = np.array([[1.0, 0.1], [0.0, 1.0]], np.float32)
  w = la.bjorck(jnp.asarray(v), steps=4)
  chex.assert_trees_all_close(np.asarray(w, np.float64), polar64(v), atol=1e-6)


def test_bjorck_zero_steps_is_identity():
  v = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 5)), jnp.float32)
  np.testing.assert_array_equal(la.bjorck(v, steps=0), v)
  np.testing.assert_array_equal(la.bjorck(v[0], 0), v[0])


@sweep(2)
def test_bjorck_batched_and_transpose(seed):
  rng = np.random.default_rng(seed)
  # Singular values in (0.7, 1.3), inside the (0, √3) basin.
  v = np.stack([(haar(32, rng) * rng.uniform(0.7, 1.3, 32)) @ haar(32, rng) for _ in range(3)])
  v = jnp.asarray(v, jnp.float32)
  batched = _bjorck(v, steps=6)
  chex.assert_shape(batched, (3, 32, 32))
  for i in range(3):
    single = _bjorck(v[i], steps=6)
    chex.assert_trees_all_close(batched[i], single, atol=1e-6)
    chex.assert_trees_all_close(np.asarray(batched[i], np.float64), polar64(v[i]), atol=1e-5)
  # Rectifying Vᵀ gives the transpose of rectifying V.
  transposed = _bjorck(jnp.swapaxes(v, -1, -2), steps=6)
  chex.assert_trees_all_close(transposed, jnp.swapaxes(batched, -1, -2), atol=1e-5)


@pytest.mark.parametrize("steps", [-1, 1.5, True, "2", None])
def test_bjorck_bad_steps(steps):
  with pytest.raises(ValueError, match="steps"):
    la.bjorck(jnp.eye(3), steps=steps)


# ----------------------------------------------------------------------------
# QR refresh (warm-started orthogonal iteration).
# ----------------------------------------------------------------------------


@jax.jit
def _iterate_qr_refresh(a, v):
  def body(_, carry):
    return la.qr_refresh(a, carry[0])

  return jax.lax.fori_loop(0, 200, body, (v, jnp.zeros(a.shape[:-1], a.dtype)))


@pytest.mark.parametrize("start", ["identity", "random"])
@sweep(3)
def test_qr_refresh_iterated_converges_to_eigh(start, seed):
  n = 32
  rng = np.random.default_rng(seed)
  eigvals = 2.0 * 0.85 ** np.arange(n)  # well separated: ratio 0.85
  a32, a64 = spd(rng.permutation(eigvals), rng)
  v0 = np.eye(n) if start == "identity" else haar(n, rng)
  p, lam = _iterate_qr_refresh(jnp.asarray(a32), jnp.asarray(v0, jnp.float32))
  chex.assert_shape(p, (n, n))
  chex.assert_shape(lam, (n,))
  chex.assert_tree_all_finite((p, lam))
  w_ref, u_ref = np.linalg.eigh(a64)
  p64, lam64 = np.asarray(p, np.float64), np.asarray(lam, np.float64)
  # Eigenvalues (sorted) match eigh.
  order = np.argsort(lam64)
  np.testing.assert_allclose(lam64[order], w_ref, rtol=1e-5, atol=1e-6 * w_ref.max())
  # Eigenvectors match up to sign: |<p_i, u_i>| ≈ 1 for matched eigenvalues.
  overlaps = np.abs(np.sum(p64[:, order] * u_ref, axis=0))
  np.testing.assert_array_less(1.0 - overlaps, 1e-4)
  # P is orthogonal and λ = diag(PᵀAP).
  assert _orth_error(p64.T) < _orth_bound(n)
  # float32 Rayleigh quotients pᵀ(Ap): two length-n inner products, each within n eps ‖A‖ (the γ_n bound).
  np.testing.assert_allclose(lam64, np.diag(p64.T @ a64 @ p64), atol=2 * n * EPS32 * w_ref.max())


@sweep(4)
def test_qr_refresh_single_step(seed):
  n = 48
  rng = np.random.default_rng(seed)
  a32, a64 = spd(rng.uniform(0.01, 3.0, n), rng)
  v = haar(n, rng).astype(np.float32)
  p, lam = _qr_refresh(jnp.asarray(a32), jnp.asarray(v))
  chex.assert_type((p, lam), jnp.float32)
  p64 = np.asarray(p, np.float64)
  assert _orth_error(p64.T) < _orth_bound(n)
  # P is the Q factor of A V (signs with R_ii >= 0), columns sorted by descending Rayleigh quotient.
  q_ref, r_ref = np.linalg.qr(a64 @ v.astype(np.float64))
  q_ref = q_ref * np.sign(np.diag(r_ref))
  order = np.argsort(-np.diag(q_ref.T @ a64 @ q_ref))
  np.testing.assert_allclose(p64, q_ref[:, order], atol=2e-4)
  assert np.all(np.diff(np.asarray(lam)) <= 0)
  # λ are the Rayleigh quotients diag(PᵀAP), computed in float64.
  np.testing.assert_allclose(np.asarray(lam, np.float64), np.diag(p64.T @ a64 @ p64), rtol=1e-5, atol=1e-6)


@sweep(5)
def test_qr_refresh_fixed_point_at_eigenvectors(seed):
  n = 48
  rng = np.random.default_rng(seed)
  eigvals = np.linspace(3.0, 0.1, n)
  a32, a64 = spd(eigvals, rng)
  w_ref, u_ref = np.linalg.eigh(a64)
  u_desc = u_ref[:, ::-1].astype(np.float32)  # columns by decreasing eigenvalue
  p, lam = _qr_refresh(jnp.asarray(a32), jnp.asarray(u_desc))
  p64 = np.asarray(p, np.float64)
  signs = np.sign(np.sum(p64 * u_desc, axis=0))
  np.testing.assert_allclose(p64 * signs, u_desc, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lam, np.float64), w_ref[::-1], rtol=1e-5)


@sweep(6)
def test_qr_refresh_batched(seed):
  rng = np.random.default_rng(seed)
  a = np.stack([spd(rng.uniform(0.1, 2.0, 16), rng)[0] for _ in range(3)])
  v = np.stack([haar(16, rng) for _ in range(3)]).astype(np.float32)
  p, lam = _qr_refresh(jnp.asarray(a), jnp.asarray(v))
  chex.assert_shape(p, (3, 16, 16))
  chex.assert_shape(lam, (3, 16))
  for i in range(3):
    p_i, lam_i = _qr_refresh(jnp.asarray(a[i]), jnp.asarray(v[i]))
    chex.assert_trees_all_close((p[i], lam[i]), (p_i, lam_i), atol=1e-5)
    p64 = np.asarray(p[i], np.float64)
    np.testing.assert_allclose(np.asarray(lam[i]), np.diag(p64.T @ a[i] @ p64), rtol=1e-5, atol=1e-6)


@sweep(7)
def test_orthonormal_basis_matches_numpy_qr(seed):
  rng = np.random.default_rng(seed)
  m = rng.standard_normal((2, 3, 20, 20)).astype(np.float32)
  q = np.asarray(jax.jit(la.orthonormal_basis)(jnp.asarray(m)), np.float64)
  chex.assert_shape(q, m.shape)
  for idx in np.ndindex(2, 3):
    q_ref, r_ref = np.linalg.qr(m[idx].astype(np.float64))
    # Q is unique up to the sign of each column.
    signs = np.sign(np.sum(q[idx] * q_ref, axis=0))
    np.testing.assert_allclose(q[idx] * signs, q_ref, atol=2e-5)


# ----------------------------------------------------------------------------
# Eigendecompositions, sorted descending.
# ----------------------------------------------------------------------------


def _spd_batch(k, n, rng, decay=0.9):
  """k float32 SPD matrices with eigenvalues decay**i (distinct gaps), and float64 copies."""
  mats = [spd(decay ** np.arange(n) * rng.uniform(0.5, 2.0), rng)[0] for _ in range(k)]
  a32 = np.stack(mats)
  return a32, a32.astype(np.float64)


def _assert_eigpairs_match(vecs, vals, a64, vec_atol):
  """Columns of ``vecs`` vs float64 eigh, descending, up to each column's sign."""
  w, u = np.linalg.eigh(a64)
  w, u = w[..., ::-1], u[..., ::-1]
  np.testing.assert_array_less(-1e-6, -np.diff(np.asarray(vals), axis=-1))  # descending
  # Weyl: |λ̂ - λ| <= ‖E‖ for float32 eigh's backward error E, ‖E‖ <= p(n) eps ‖A‖ with p(n) = 2n here.
  np.testing.assert_allclose(vals, w, atol=2 * w.shape[-1] * EPS32 * np.abs(w).max(), rtol=0)
  v = np.asarray(vecs, np.float64)
  signs = np.sign(np.sum(v * u, axis=-2, keepdims=True))
  np.testing.assert_allclose(v * signs, u, atol=vec_atol)


@sweep(20)
def test_eigh_descending_matches_numpy_float64(seed):
  rng = np.random.default_rng(seed)
  a32, a64 = _spd_batch(3, 24, rng)
  vecs, vals = _eigh(jnp.asarray(a32))
  chex.assert_shape((vecs, vals), ((3, 24, 24), (3, 24)))
  _assert_eigpairs_match(vecs, vals, a64, vec_atol=1e-3)
  # Unbatched input (the batched code path) and a 2-level batch agree with the stacked one.
  single_vecs, single_vals = _eigh(jnp.asarray(a32[1]))
  np.testing.assert_allclose(single_vals, vals[1], rtol=1e-6)
  nested_vecs, nested_vals = _eigh(jnp.asarray(a32[:2].reshape(1, 2, 24, 24)))
  np.testing.assert_allclose(nested_vals[0], vals[:2], rtol=1e-6)


@sweep(21)
def test_eigh_where_decomposes_only_where_needed(seed):
  rng = np.random.default_rng(seed)
  a32, a64 = _spd_batch(3, 16, rng)
  keep_vecs = rng.standard_normal((3, 16, 16)).astype(np.float32)
  keep_vals = rng.standard_normal((3, 16)).astype(np.float32)
  need = np.array([True, False, True])
  vecs, vals = _eigh_where(jnp.asarray(need), jnp.asarray(a32), jnp.asarray(keep_vecs), jnp.asarray(keep_vals))
  np.testing.assert_array_equal(vecs[1], keep_vecs[1])
  np.testing.assert_array_equal(vals[1], keep_vals[1])
  _assert_eigpairs_match(vecs[need], vals[need], a64[need], vec_atol=1e-3)


@sweep(22)
def test_qr_refresh_converges_to_sorted_eigenpairs(seed):
  rng = np.random.default_rng(seed)
  a32, a64 = _spd_batch(2, 16, rng, decay=0.5)  # well-separated spectrum: fast subspace iteration
  start = np.stack([haar(16, rng) for _ in range(2)]).astype(np.float32)
  vecs, vals = _qr_refresh(jnp.asarray(a32), jnp.asarray(start), iterations=60)
  _assert_eigpairs_match(vecs, vals, a64, vec_atol=2e-3)
  # One step returns orthonormal columns, sorted by their Rayleigh quotients.
  vecs1, vals1 = _qr_refresh(jnp.asarray(a32), jnp.asarray(start))
  v = np.asarray(vecs1, np.float64)
  for i in range(2):
    assert _orth_error(v[i]) < _orth_bound(16)
    np.testing.assert_allclose(vals1[i], np.sum(v[i] * (a64[i] @ v[i]), axis=0), rtol=1e-4, atol=1e-7)
    assert np.all(np.diff(np.asarray(vals1[i])) <= 0)


def _qr_rayleigh_bound(vals, iterations, amplified):
  r"""Bound on :math:`|\hat\lambda_i - \lambda_i|` after ``iterations`` float32 QR steps from an eigenbasis.

  Each step's products :math:`AP` and :math:`p_i^\top A p_i` are inner products of length ``n``: an absolute
  error :math:`\le n\,\epsilon\,\lambda_{max}` each (the standard :math:`\gamma_n` bound), hence the term
  :math:`2n\epsilon\lambda_{max}`. From a *reversed* basis (``amplified``) the step is power iteration on the
  leading columns, the smallest eigenvector first: the rounding error that leaves the column's eigen-direction,
  :math:`\delta \le n\epsilon\kappa` after one step, grows by :math:`\kappa = \lambda_{max}/\lambda_{min}`
  per step, so :math:`\delta_k \le n\epsilon\kappa^k`; a unit vector at angle :math:`\delta` from an
  eigenvector has a Rayleigh quotient within :math:`\delta^2\lambda_{max}` of its eigenvalue.
  """
  vals = np.asarray(vals, np.float64)
  n, eps = vals.shape[-1], EPS32
  lam_max = vals.max(axis=-1, keepdims=True)
  drift = n * eps * (lam_max / vals.min(axis=-1, keepdims=True)) ** iterations if amplified else 0.0
  return np.broadcast_to((2 * n * eps + drift**2) * lam_max, vals.shape)


@pytest.mark.parametrize("iterations", [1, 3])
@sweep(23)
def test_qr_refresh_warm_started_from_eigh_stays_put(iterations, seed):
  """A QR step from the exact descending eigenbasis returns it (same signs, same order)."""
  rng = np.random.default_rng(seed)
  a32, _ = _spd_batch(2, 32, rng)
  vecs, vals = _eigh(jnp.asarray(a32))
  again, again_vals = _qr_refresh(jnp.asarray(a32), vecs, iterations=iterations)
  # Observed <= 3e-6 over 20 seeds (x86-64): the columns move by O(n eps kappa), far below 2e-4.
  np.testing.assert_allclose(again, vecs, atol=2e-4)
  np.testing.assert_array_less(np.abs(again_vals - vals), _qr_rayleigh_bound(vals, iterations, amplified=False))
  # An ascending basis is not a fixed point of the (sorting) step: the order is restored (strictly descending,
  # as the spectrum's gaps are >= 10 %) and the values are within the bound of the power-iteration drift.
  ascending = vecs[..., ::-1]
  _, vals_from_ascending = _qr_refresh(jnp.asarray(a32), ascending, iterations=iterations)
  assert np.all(np.diff(np.asarray(vals_from_ascending), axis=-1) < 0)
  np.testing.assert_array_less(np.abs(vals_from_ascending - vals), _qr_rayleigh_bound(vals, iterations, amplified=True))


def test_qr_refresh_rejects_bad_iterations():
  with pytest.raises(ValueError, match="iterations"):
    la.qr_refresh(jnp.eye(3), jnp.eye(3), iterations=0)


def test_eigh_of_nonfinite_matrix_is_nonfinite():
  a = np.eye(8, dtype=np.float32)
  a[2, 3] = a[3, 2] = np.nan
  vecs, vals = _eigh(jnp.asarray(np.stack([a, np.eye(8, dtype=np.float32)])))
  assert not np.all(np.isfinite(vecs[0])) or not np.all(np.isfinite(vals[0]))
  np.testing.assert_allclose(vals[1], 1.0)


_CONCURRENT_REFRESH_SCRIPT = """
import os, sys
os.sched_setaffinity(0, [int(c) for c in sys.argv[1:]])  # 2 CPUs: XLA's pool gets 2 threads
import jax, jax.numpy as jnp, optax_shampoo4 as s4
params = {"a": jnp.zeros((512, 512)), "b": jnp.zeros((384, 384)), "c": jnp.zeros((320, 320))}
for method in ("qr", "eigh", "adaptive"):  # batched QR and batched eigh both deadlock the pool
  tx = s4.scale_by_shampoo4(stats_every=1, root_every=1, refresh_method=method, refresh_tol=0.0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(2):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
    updates, state = step(grads, state, params)
    jax.block_until_ready(updates)
  print("done", method, int(state.count), int(state.failed_refreshes))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins CPUs with os.sched_setaffinity (Linux only)")
def test_concurrent_bucket_refreshes_do_not_deadlock_on_cpu():
  """Three factor buckets refresh their eigenvectors in one step, on 2 cores.

  Each refresh method in turn (QR; eigh; adaptive with τ = 0, i.e. eigh
  under per-factor ``lax.cond``). A batched CPU QR or eigh per bucket deadlocks XLA's 2-thread pool (each QR waits
  on pool threads held by the others); this runs in a subprocess with a
  timeout so a regression fails instead of hanging the suite.
  """
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < 2:
    pytest.skip("the deadlock needs an XLA pool of 2 threads; this machine offers 1 CPU")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-c", _CONCURRENT_REFRESH_SCRIPT, *map(str, cpus[:2])],
      env=env, capture_output=True, text=True, timeout=600,
      cwd=str(pathlib.Path(__file__).resolve().parents[1]),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  for method in ("qr", "eigh", "adaptive"):
    assert f"done {method} 2 0" in result.stdout, result.stdout


# ----------------------------------------------------------------------------
# Gram–Schmidt of rows (the exactly orthonormal 4-bit tail of SOAP's bases).
# ----------------------------------------------------------------------------


def _gram_schmidt64(rows):
  """Float64 Gram–Schmidt of rows in order (each projection done twice, so the reference is orthonormal)."""
  out = []
  for r in np.asarray(rows, np.float64):
    for _ in range(2):
      for q in out:
        r = r - (q @ r) * q
    out.append(r / np.linalg.norm(r))
  return np.array(out)


@sweep(9)
def test_orthonormal_rows_is_float64_gram_schmidt(seed):
  rng = np.random.default_rng(seed)
  rows = rng.standard_normal((2, 12, 20)).astype(np.float32)
  got = np.asarray(jax.jit(la.orthonormal_rows)(jnp.asarray(rows)), np.float64)
  for k in range(2):
    # Householder QR is backward stable: Q's forward error is O(kappa n u) ~ 10 * 20 * 6e-8 = 1.2e-5 for these
    # Gaussian 12 x 20 matrices (kappa ~ 10); 5e-5 leaves headroom while a sign flip or a wrong order is O(1).
    np.testing.assert_allclose(got[k], _gram_schmidt64(rows[k]), atol=5e-5)


@sweep(10)
def test_orthonormal_head_first_parts_keeps_the_head_and_orthonormalizes_the_tail(seed):
  rng = np.random.default_rng(seed)
  n, head_rows = 24, 4
  v = (haar(n, rng) + 0.03 * rng.standard_normal((n, n))).astype(np.float32)  # a 4-bit-like perturbation
  got = np.asarray(la.orthonormal_head_first_parts(jnp.asarray(v[:head_rows]), jnp.asarray(v[head_rows:]), 1),
                   np.float64)
  v64 = v.astype(np.float64)
  head = 1.5 * v64[:head_rows] - 0.5 * v64[:head_rows] @ v64[:head_rows].T @ v64[:head_rows]  # one Björck step
  tail = _gram_schmidt64(v64[head_rows:] - v64[head_rows:] @ head.T @ head)
  # Well-conditioned (near-orthogonal) inputs: float32 products and QR err by O(n u) ~ 1e-6; 2e-5 is >= 10x that.
  np.testing.assert_allclose(got, np.concatenate([head, tail]), atol=2e-5)
  np.testing.assert_allclose(got[head_rows:] @ got[head_rows:].T, np.eye(n - head_rows), atol=2e-5)
  np.testing.assert_array_equal(la.orthonormal_head_first_parts(jnp.asarray(v[:4]), jnp.asarray(v[4:]), 0), v)
