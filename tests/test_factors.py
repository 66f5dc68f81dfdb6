"""Tests for factor buckets: init, PU, PIRU, and the paper's error ordering."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_shampoo as ref
from helpers import mark_slow, sweep

from optax_shampoo4 import factors as fct
from optax_shampoo4 import quantization as qz


def _spd(n, cond, seed=0, two_level=False):
  """U diag(λ) Uᵀ in float64 with a Haar-random U and cond(A) = cond."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((n, n)))
  if two_level:
    lam = np.where(np.arange(n) < n // 10, 1.0, 1.0 / cond)
  else:
    lam = np.logspace(0, -np.log10(cond), n)
  return (u * lam) @ u.T, u, lam


def _nre(approx, exact):
  return np.linalg.norm(approx - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("state_format, quantized", [("eigen", True), ("eigen", False),
                                                     ("naive", True), ("fp32", False)])
def test_init_is_epsilon_identity_and_identity_root(state_format, quantized):
  config = fct.FactorConfig(state_format=state_format)
  bucket = fct.init_bucket(config, 70, 3, quantized, 1e-6)
  roots = fct.root_matrices(bucket)
  chex.assert_shape(roots, (3, 70, 70))
  np.testing.assert_array_equal(roots, np.broadcast_to(np.eye(70), (3, 70, 70)))
  if state_format == "eigen":
    np.testing.assert_array_equal(fct.load(bucket.eigvecs), roots)
    np.testing.assert_allclose(bucket.eigvals, np.full((3, 70), 1e-6))
  else:
    np.testing.assert_allclose(fct.load(bucket.stats), 1e-6 * roots, rtol=1e-7)
  assert fct.is_quantized(bucket.root) == quantized


def _eigen_bucket(config, a, u, lam, quantized=True):
  """A one-factor eigen bucket holding the exact eigenpairs of ``a``."""
  eigvecs = config.store(jnp.asarray(u.T[None], jnp.float32), quantized, separate_diag=False)
  root = config.store(jnp.eye(a.shape[0])[None], quantized, separate_diag=True)
  return fct.EigenFactors(eigvecs, jnp.asarray(lam[None], jnp.float32), root)


def _naive_bucket(config, a):
  stats = config.store(jnp.asarray(a[None], jnp.float32), True, separate_diag=True)
  root = config.store(jnp.eye(a.shape[0])[None], True, separate_diag=True)
  return fct.MatrixFactors(stats, root)


@pytest.mark.slow
def test_eigen_pipeline_beats_naive_on_ill_conditioned_1024():
  """Paper Table 1: quantizing eigenvectors (U, B + OR) is far better than A (A, B)."""
  n, epsilon = 1024, 1e-6
  a, u, lam = _spd(n, 1e5, seed=1)
  exact = ref.inverse_root(a, epsilon)
  config = fct.FactorConfig(state_format="eigen")
  eigen_root = jax.jit(lambda b: fct.root_matrices(fct.update_root(config, b, epsilon)[0]))(
      _eigen_bucket(config, a, u, lam))[0]
  naive_config = fct.FactorConfig(state_format="naive", root_method="newton")
  naive_root = jax.jit(lambda b: fct.root_matrices(fct.update_root(naive_config, b, epsilon)[0]))(
      _naive_bucket(naive_config, a))[0]
  eigen_err = _nre(np.asarray(eigen_root, np.float64), exact)
  naive_err = _nre(np.asarray(naive_root, np.float64), exact)
  # Paper (A1, Linear-2, 4-bit): (U, B)+OR 0.047 vs (A, B) 0.62.
  assert eigen_err < 0.1, eigen_err
  assert naive_err > 4 * eigen_err, (eigen_err, naive_err)


def _pipeline_root_error(a, u, lam, epsilon, **config_kwargs):
  """NRE of A^(-1/4) through 4-bit U, Björck, root, 4-bit off-diagonal root."""
  config = fct.FactorConfig(**config_kwargs)
  new, accepted = fct.update_root(config, _eigen_bucket(config, a, u, lam), epsilon)
  assert bool(accepted.all())
  return _nre(np.asarray(fct.root_matrices(new)[0], np.float64), ref.inverse_root(a, epsilon))


@pytest.mark.parametrize("two_level", [True, False])
def test_bjorck_and_linear2_lower_root_error(two_level):
  """Paper Table 5 orderings: (U, B) + OR < (U, B), and Linear-2 < DT."""
  a, u, lam = _spd(256, 1e4, seed=2, two_level=two_level)
  errors = {
      (mapping, steps): _pipeline_root_error(a, u, lam, 1e-6, mapping=mapping, bjorck_steps=(1, steps))
      for mapping in ("linear2", "dynamic_tree") for steps in (0, 4)
  }
  for mapping in ("linear2", "dynamic_tree"):
    assert errors[mapping, 4] < 0.75 * errors[mapping, 0], errors
  for steps in (0, 4):
    assert errors["linear2", steps] < errors["dynamic_tree", steps], errors
  assert errors["linear2", 4] < 0.1, errors


@sweep(3)
def test_update_stats_converges_to_eigh_when_iterated(seed):
  """Repeated PU steps on a fixed statistic give its eigenpairs (fp32 storage)."""
  n = 48
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((n, n)))
  lam = np.linspace(1.0, 2.0, n) ** 4
  gram = (u * lam) @ u.T
  config = fct.FactorConfig()
  bucket = fct.init_bucket(config, n, 1, False, 0.0)
  step = jax.jit(lambda b: fct.update_stats(config, b, jnp.asarray(gram[None], jnp.float32), 0.0)[0])
  for _ in range(300):
    bucket = step(bucket)
  np.testing.assert_allclose(np.sort(bucket.eigvals[0]), np.sort(lam), rtol=1e-4)
  vecs = np.asarray(bucket.eigvecs[0], np.float64)  # rows are eigenvectors
  np.testing.assert_allclose(vecs.T @ np.diag(np.asarray(bucket.eigvals[0], np.float64)) @ vecs,
                             gram, rtol=1e-3, atol=1e-3 * lam.max())


def test_update_stats_is_ema_in_matrix_formats():
  rng = np.random.default_rng(4)
  grams = rng.standard_normal((2, 70, 5))
  grams = np.einsum("kij,klj->kil", grams, grams)
  config = fct.FactorConfig(state_format="fp32")
  bucket = fct.init_bucket(config, 70, 2, False, 1e-3)
  new, accepted = fct.update_stats(config, bucket, jnp.asarray(grams, jnp.float32), 0.9)
  np.testing.assert_allclose(new.stats, 0.9 * 1e-3 * np.eye(70) + 0.1 * grams, rtol=1e-5, atol=1e-7)
  assert accepted.tolist() == [True, True]


@pytest.mark.parametrize("state_format", [pytest.param("eigen", marks=pytest.mark.slow), "naive", "fp32"])
def test_non_finite_refresh_keeps_previous_factor(state_format):
  config = fct.FactorConfig(state_format=state_format)
  quantized = state_format != "fp32"
  bucket = fct.init_bucket(config, 64, 3, quantized, 1e-6)
  rng = np.random.default_rng(5)
  g = rng.standard_normal((3, 64, 64)).astype(np.float32)
  grams = np.einsum("kij,klj->kil", g, g)
  grams[1, 2, 3] = np.nan  # only factor 1 is poisoned
  new, accepted = fct.update_stats(config, bucket, jnp.asarray(grams), 0.9)
  assert accepted.tolist() == [True, False, True]
  old_leaves, new_leaves = jax.tree.leaves(bucket), jax.tree.leaves(new)
  for old, fresh in zip(old_leaves, new_leaves):
    np.testing.assert_array_equal(fresh[1], old[1])  # kept
  assert any(not np.array_equal(f[0], o[0]) for o, f in zip(old_leaves, new_leaves))  # others moved on
  chex.assert_tree_all_finite(new)
  new_root, accepted = fct.update_root(config, new, 1e-6)
  assert bool(accepted.all())
  chex.assert_tree_all_finite(new_root)


def test_eigen_bucket_stores_eigenvectors_as_rows():
  """Each quantization block lies inside one eigenvector (paper §3.3)."""
  n = 80
  a, u, lam = _spd(n, 100.0, seed=6)
  config = fct.FactorConfig(quant_block=16)
  bucket = _eigen_bucket(config, a, u, lam)
  assert isinstance(bucket.eigvecs, qz.QuantizedArray)
  # Row i's scales are the block absmax of eigenvector i (column i of u).
  expected = np.abs(u.T.reshape(n, n // 16, 16)).max(-1)
  np.testing.assert_allclose(bucket.eigvecs.scales[0], expected, rtol=1e-6)


# ----------------------------------------------------------------------------
# Refresh methods of the eigen statistic.
# ----------------------------------------------------------------------------


def _refresh_setup(n=24, k=2, seed=10):
  """An unquantized eigen bucket with random bases, grams, and the float64 updated statistics."""
  rng = np.random.default_rng(seed)
  bases = np.stack([np.linalg.qr(rng.standard_normal((n, n)))[0] for _ in range(k)]).astype(np.float32)
  eigvals = np.sort(rng.uniform(0.1, 2.0, (k, n)), axis=1)[:, ::-1].astype(np.float32)
  g = rng.standard_normal((k, n, 6)).astype(np.float32)
  grams = np.einsum("kij,klj->kil", g, g)
  bucket = fct.EigenFactors(jnp.asarray(np.swapaxes(bases, 1, 2)), jnp.asarray(eigvals),
                            jnp.broadcast_to(jnp.eye(n), (k, n, n)))
  beta = 0.9
  b64, l64 = bases.astype(np.float64), eigvals.astype(np.float64)
  stats = beta * np.einsum("kij,kj,klj->kil", b64, l64, b64) + (1 - beta) * grams.astype(np.float64)
  return bucket, jnp.asarray(grams), beta, stats, b64


def _check_exact(new, stats):
  w, u = np.linalg.eigh(stats)
  w, u = w[:, ::-1], u[:, :, ::-1]
  np.testing.assert_allclose(new.eigvals, w, rtol=1e-5, atol=1e-6 * w.max())
  rows = np.asarray(new.eigvecs, np.float64)  # rows are eigenvectors
  signs = np.sign(np.einsum("kij,kji->ki", rows, u))[:, :, None]
  np.testing.assert_allclose(rows * signs, np.swapaxes(u, 1, 2), atol=2e-4)


@pytest.mark.parametrize("method, kwargs", [("eigh", {}), ("adaptive", {"refresh_tol": 0.0})])
@sweep(10)
def test_exact_refresh_matches_float64_eigh_descending(method, kwargs, seed):
  bucket, grams, beta, stats, _ = _refresh_setup(seed=seed)
  config = fct.FactorConfig(refresh_method=method, **kwargs)
  new, accepted = jax.jit(lambda b, m: fct.update_stats(config, b, m, beta))(bucket, grams)
  assert accepted.tolist() == [True, True]
  _check_exact(new, stats)
  np.testing.assert_array_equal(new.root, bucket.root)


@pytest.mark.parametrize("iterations", [1, 3])
@sweep(11)
def test_qr_refresh_method_matches_float64_subspace_iteration(iterations, seed):
  bucket, grams, beta, stats, bases = _refresh_setup(seed=seed)
  config = fct.FactorConfig(refresh_method="qr", qr_iterations=iterations)
  new, _ = jax.jit(lambda b, m: fct.update_stats(config, b, m, beta))(bucket, grams)
  for i in range(2):
    p = bases[i]
    for _ in range(iterations):
      q, r = np.linalg.qr(stats[i] @ p)
      p = q * np.sign(np.diag(r))
    lam = np.einsum("ij,ik,kj->j", p, stats[i], p)
    order = np.argsort(-lam)
    np.testing.assert_allclose(new.eigvals[i], lam[order], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.eigvecs[i], np.float64), p[:, order].T, atol=5e-4)


def test_adaptive_refresh_keeps_a_basis_that_still_diagonalizes():
  """Factor 0's new statistic is diagonal in its basis (kept, λ = diag B); factor 1's is not (eigh)."""
  bucket, grams, beta, stats, bases = _refresh_setup(seed=12)
  mu = np.random.default_rng(0).uniform(0.0, 3.0, 24)
  gram0 = (bases[0] * mu) @ bases[0].T  # same eigenbasis as factor 0's statistic
  grams = grams.at[0].set(jnp.asarray(gram0, jnp.float32))
  stats[0] = beta * (bases[0] * np.asarray(bucket.eigvals[0], np.float64)) @ bases[0].T + (1 - beta) * gram0
  config = fct.FactorConfig(refresh_method="adaptive", refresh_tol=1e-3)
  new, accepted = jax.jit(lambda b, m: fct.update_stats(config, b, m, beta))(bucket, grams)
  assert accepted.tolist() == [True, True]
  lam0 = beta * np.asarray(bucket.eigvals[0], np.float64) + (1 - beta) * mu
  order = np.argsort(-lam0)
  np.testing.assert_allclose(new.eigvals[0], lam0[order], rtol=1e-5)
  np.testing.assert_allclose(new.eigvecs[0], np.asarray(bucket.eigvecs[0])[order], atol=1e-6)  # kept rows
  w1 = np.linalg.eigh(stats[1])[0][::-1]
  np.testing.assert_allclose(new.eigvals[1], w1, rtol=1e-5, atol=1e-6 * w1.max())


@pytest.mark.slow
def test_adaptive_refresh_is_exact_from_the_initial_identity_basis():
  n = 64
  rng = np.random.default_rng(13)
  g = rng.standard_normal((1, n, 8)).astype(np.float32)
  grams = np.einsum("kij,klj->kil", g, g)
  stats = 0.9 * 1e-6 * np.eye(n) + 0.1 * grams[0].astype(np.float64)
  for method, kwargs in [("adaptive", {}), ("qr", {"initial_eigh": True})]:
    config = fct.FactorConfig(refresh_method=method, **kwargs)
    bucket = fct.init_bucket(config, n, 1, True, 1e-6)
    new, _ = fct.update_stats(config, bucket, jnp.asarray(grams), 0.9)
    w = np.linalg.eigh(stats)[0][::-1]
    np.testing.assert_allclose(new.eigvals[0], w, rtol=1e-4, atol=1e-5 * w.max())
  # The paper's QR step from I keeps only diag(A)'s ordering: its λ are not A's eigenvalues.
  config = fct.FactorConfig(refresh_method="qr")
  new, _ = fct.update_stats(config, fct.init_bucket(config, n, 1, True, 1e-6), jnp.asarray(grams), 0.9)
  assert np.abs(np.asarray(new.eigvals[0]) - w).max() > 1e-2 * w.max()


@pytest.mark.parametrize("method", fct.REFRESH_METHODS)
def test_failed_refresh_is_kept_and_reported_for_every_method(method):
  config = fct.FactorConfig(refresh_method=method, refresh_tol=0.0)
  bucket, grams, beta, stats, _ = _refresh_setup(seed=14, k=3)
  grams = grams.at[1, 2, 3].set(jnp.nan)
  new, accepted = jax.jit(lambda b, m: fct.update_stats(config, b, m, beta))(bucket, grams)
  assert accepted.tolist() == [True, False, True]
  for old, fresh in zip(jax.tree.leaves(bucket), jax.tree.leaves(new)):
    np.testing.assert_array_equal(fresh[1], old[1])
  chex.assert_tree_all_finite(new)


@pytest.mark.parametrize("method", mark_slow(fct.REFRESH_METHODS, "qr"))
def test_update_stats_without_a_root(method):
  """Root-less eigen buckets (``root=None``, e.g. for a SOAP-style rotation) refresh the same way."""
  config = fct.FactorConfig(refresh_method=method, bits=4, quant_block=16)
  full = fct.init_bucket(config, 32, 2, True, 1e-6)
  rootless = full._replace(root=None)
  grams = jnp.asarray(np.random.default_rng(15).standard_normal((2, 32, 32)), jnp.float32)
  grams = grams @ jnp.swapaxes(grams, 1, 2)
  new_full, _ = fct.update_stats(config, full, grams, 0.9)
  new_rootless, accepted = fct.update_stats(config, rootless, grams, 0.9)
  assert new_rootless.root is None and accepted.tolist() == [True, True]
  chex.assert_trees_all_equal(new_rootless.eigvecs, new_full.eigvecs)
  chex.assert_trees_all_equal(new_rootless.eigvals, new_full.eigvals)
