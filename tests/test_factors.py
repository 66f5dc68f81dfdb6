"""Tests for factor buckets: init, PU, PIRU, and the paper's error ordering."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_shampoo as ref

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


def test_update_stats_converges_to_eigh_when_iterated():
  """Repeated PU steps on a fixed statistic give its eigenpairs (fp32 storage)."""
  n = 48
  rng = np.random.default_rng(3)
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


@pytest.mark.parametrize("state_format", ["eigen", "naive", "fp32"])
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
