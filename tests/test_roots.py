"""Tests of ``optax_shampoo4/roots.py`` against float64 numpy: the inverse root from eigenpairs, the coupled
Newton inverse root, power iteration and Jorge's matmul-only root update.

For Jorge's update the reference follows the EMA statistic with the β the update reports and takes its inverse
4th root from ``numpy.linalg.eigh``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import haar, inverse_root64, rel, spd, sweep

from optax_shampoo4 import roots as root_fns

EPS32 = float(np.finfo(np.float32).eps)

# Compiled once per shape and static arguments (cheaper than op-by-op dispatch).
_from_eig = jax.jit(root_fns.inverse_root_from_eig, static_argnames="p")
_newton = jax.jit(root_fns.inverse_root_newton, static_argnames=("p", "max_iters"))
_power = jax.jit(root_fns.power_iteration, static_argnames="num_iters")


# ----------------------------------------------------------------------------
# Inverse root from eigenpairs (4-bit Shampoo's default, Alg. 2 line 3).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, 1e-6])
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("cond", [1e0, 1e2, 1e4, 1e6])
@sweep(7)
def test_inverse_root_from_eig_vs_float64(cond, p, epsilon, seed):
  n = 64
  rng = np.random.default_rng(seed)
  u = haar(n, rng).astype(np.float32)
  eigvals = rng.permutation(np.logspace(0, -np.log10(cond), n)).astype(np.float32)
  out = _from_eig(jnp.asarray(u), jnp.asarray(eigvals), jnp.float32(epsilon), p=p)
  chex.assert_shape(out, (n, n))
  chex.assert_type(out, jnp.float32)
  u64, w64 = u.astype(np.float64), eigvals.astype(np.float64)
  ref = (u64 * (w64 + epsilon * w64.max()) ** (-1.0 / p)) @ u64.T
  assert rel(out, ref) < 1e-5


@sweep(8)
def test_inverse_root_from_eig_negative_and_zero_eigenvalues(seed):
  n = 64
  rng = np.random.default_rng(seed)
  u = haar(n, rng).astype(np.float32)
  eigvals = rng.uniform(0.1, 2.0, n).astype(np.float32)
  eigvals[[3, 7]] = [-1e-3, 0.0]  # rounding noise of a PSD matrix
  out = _from_eig(jnp.asarray(u), jnp.asarray(eigvals), jnp.float32(1e-2), p=4)
  u64, w64 = u.astype(np.float64), np.maximum(eigvals.astype(np.float64), 0.0)
  ref = (u64 * (w64 + 1e-2 * w64.max()) ** -0.25) @ u64.T
  assert rel(out, ref) < 1e-5
  # Zero (and negative) eigenvalues without damping, or all-zero eigenvalues:
  # finite, no NaN/inf.
  chex.assert_tree_all_finite(_from_eig(jnp.asarray(u), jnp.asarray(eigvals), jnp.float32(0.0), p=4))
  chex.assert_tree_all_finite(_from_eig(jnp.asarray(u), jnp.zeros(n), jnp.float32(1e-6), p=4))
  chex.assert_tree_all_finite(_from_eig(jnp.asarray(u), jnp.zeros(n), jnp.float32(0.0), p=4))


@sweep(9)
def test_inverse_root_from_eig_batched_uses_per_matrix_max(seed):
  n = 16
  rng = np.random.default_rng(seed)
  u = np.stack([haar(n, rng) for _ in range(3)]).astype(np.float32)
  scales = np.array([1.0, 1e3, 1e-3])
  eigvals = (rng.uniform(1e-3, 1.0, (3, n)) * scales[:, None]).astype(np.float32)
  epsilon = 1e-2
  out = _from_eig(jnp.asarray(u), jnp.asarray(eigvals), jnp.float32(epsilon), p=4)
  chex.assert_shape(out, (3, n, n))
  for i in range(3):
    u64, w64 = u[i].astype(np.float64), eigvals[i].astype(np.float64)
    ref = (u64 * (w64 + epsilon * w64.max()) ** -0.25) @ u64.T
    assert rel(out[i], ref) < 1e-5, i


# ----------------------------------------------------------------------------
# Coupled Newton inverse root.
# ----------------------------------------------------------------------------

def _newton_tol(cond, p, n):
  r"""Relative error bound of a float32 inverse p-th root of an SPD matrix with condition number ``cond``.

  First-order perturbation: storing A in float32 perturbs it by :math:`\epsilon\|A\|`, which moves
  :math:`A^{-1/p}` by up to :math:`(\kappa/p)\,\epsilon` relative (the derivative of :math:`\lambda^{-1/p}`
  at :math:`\lambda_{min}`); the iteration's own products add :math:`n\epsilon` (the :math:`\gamma_n` bound).
  Measured over 20 seeds at n = 64: 1.2e-7, 1.2e-6, 4.5e-5, 3.0e-3 for cond 1, 1e2, 1e4, 1e6 (>= 6x below).
  """
  return (n + cond / p) * EPS32


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("cond", [1e0, 1e2, 1e4, 1e6])
@sweep(10)
def test_inverse_root_newton_vs_float64(cond, p, seed):
  n = 64
  rng = np.random.default_rng(seed)
  a32, a64 = spd(np.logspace(0, -np.log10(cond), n), rng)
  out = _newton(jnp.asarray(a32), jnp.float32(0.0), p=p)
  chex.assert_shape(out, (n, n))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  assert rel(out, inverse_root64(a64, 0.0, p)) < _newton_tol(cond, p, n)


@pytest.mark.parametrize("p", [2, 4])
@sweep(11)
def test_inverse_root_newton_damping(p, seed):
  n = 64
  rng = np.random.default_rng(seed)
  # A dominant top eigenvalue, so power iteration's λmax is exact.
  eigvals = np.concatenate([[1.0], np.logspace(-1, -6, n - 1)])
  a32, a64 = spd(eigvals, rng)
  epsilon = 1e-3
  out = _newton(jnp.asarray(a32), jnp.float32(epsilon), p=p)
  ref = inverse_root64(a64, epsilon, p, lam_max=np.linalg.eigvalsh(a64).max())
  assert rel(out, ref) < 1e-4
  # The damping matters here: without it the answer is far off.
  assert rel(ref, inverse_root64(a64, 0.0, p)) > 0.5


def test_inverse_root_newton_1x1_returns_one():
  np.testing.assert_array_equal(root_fns.inverse_root_newton(jnp.array([[5.0]]), 1e-6), [[1.0]])
  np.testing.assert_array_equal(root_fns.inverse_root_newton(jnp.array([[0.0]]), 0.0, p=2), [[1.0]])
  batched = root_fns.inverse_root_newton(jnp.arange(1.0, 4.0).reshape(3, 1, 1), 1e-6)
  chex.assert_shape(batched, (3, 1, 1))
  np.testing.assert_array_equal(batched, np.ones((3, 1, 1)))


@sweep(12)
def test_inverse_root_newton_batched_different_convergence(seed):
  n = 64
  rng = np.random.default_rng(seed)
  easy = 4.0 * np.eye(n, dtype=np.float32)  # converges in a few steps
  hard, hard64 = spd(np.logspace(0, -4, n), rng)  # needs many more
  a = jnp.asarray(np.stack([easy, hard]))
  out = _newton(a, jnp.float32(0.0), p=4)
  chex.assert_shape(out, (2, n, n))
  np.testing.assert_allclose(np.asarray(out[0]), 4.0**-0.25 * np.eye(n), atol=1e-6)
  assert rel(out[1], inverse_root64(hard64, 0.0, 4)) < _newton_tol(1e4, 4, n)
  # Same as one matrix at a time, and as vmap.
  for i in range(2):
    chex.assert_trees_all_close(out[i], _newton(a[i], jnp.float32(0.0), p=4), rtol=1e-5, atol=1e-6)
  vmapped = jax.jit(jax.vmap(lambda m: root_fns.inverse_root_newton(m, 0.0, p=4)))(a)
  chex.assert_trees_all_close(vmapped, out, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Power iteration.
# ----------------------------------------------------------------------------


def _power64(a, num_iters=10, tol=1e-6):
  """Float64 power iteration from the documented start vector: the Rayleigh quotients at the stop.

  Same iteration and stopping rule as ``root_fns.power_iteration`` (a batch stops when every matrix has).
  """
  v = np.asarray(jax.random.uniform(jax.random.key(0), (a.shape[-1],), jnp.float32, -1.0, 1.0), np.float64)
  v = np.broadcast_to(v / np.linalg.norm(v), a.shape[:-1])
  previous, i = np.inf, 0
  while True:
    w = np.einsum("...ij,...j->...i", a, v)
    rayleigh = np.sum(v * w, axis=-1)
    v, i = w / np.linalg.norm(w, axis=-1, keepdims=True), i + 1
    if i >= num_iters or not np.any(np.abs(rayleigh - previous) > tol):
      return rayleigh
    previous = rayleigh


@sweep(13)
def test_power_iteration_random_spd(seed):
  # Wishart matrices have no guaranteed gap at the top, so 10 steps may stop well below λmax: the estimate is
  # compared with the same iteration in float64. Each float32 step perturbs the Rayleigh quotient by <= 2n eps
  # λmax (two length-n inner products, the γ_n bound): 10 steps and the stopping tolerance 1e-6 bound the gap.
  n, batch = 64, 6
  rng = np.random.default_rng(seed)
  g = rng.standard_normal((batch, n, n))
  a = (g @ np.swapaxes(g, -1, -2) / n).astype(np.float32)
  a64 = a.astype(np.float64)
  lam_max = np.linalg.eigvalsh(a64)[..., -1]
  bound = 10 * 2 * n * EPS32 * lam_max + 1e-6
  est = _power(jnp.asarray(a))
  chex.assert_shape(est, (batch,))
  est = np.asarray(est, np.float64)
  np.testing.assert_array_less(np.abs(est - _power64(a64)), bound)
  np.testing.assert_array_less(est, lam_max * (1 + 2 * n * EPS32))  # a Rayleigh quotient is <= λmax
  np.testing.assert_array_less(0.5 * lam_max, est)  # and useful as λmax (measured >= 0.77 λmax, 20 seeds)
  for i in range(2):
    single = float(_power(jnp.asarray(a[i])))
    assert abs(single - _power64(a64[i])) < bound[i]


@sweep(14)
def test_power_iteration_exact_with_dominant_eigenvalue(seed):
  n = 64
  rng = np.random.default_rng(seed)
  diag = rng.uniform(0.0, 1.0, n)
  diag[17] = 10.0
  est = _power(jnp.asarray(np.diag(diag), jnp.float32))
  np.testing.assert_allclose(float(est), 10.0, rtol=1e-5)
  # The same in a rotated basis.
  a32, a64 = spd(np.concatenate([[5.0], rng.uniform(0.0, 0.5, n - 1)]), rng)
  np.testing.assert_allclose(float(_power(jnp.asarray(a32))), np.linalg.eigvalsh(a64).max(), rtol=1e-5)


def test_power_iteration_zero_matrix():
  est = _power(jnp.zeros((6, 64, 64)))
  chex.assert_shape(est, (6,))
  np.testing.assert_array_equal(est, 0.0)


# ----------------------------------------------------------------------------
# Jorge's inverse-root update (roots.jorge_root_update).
# ----------------------------------------------------------------------------

N = 16
STEPS = 80


def _np_root(m):
  lam, u = np.linalg.eigh((m + m.T) / 2.0)
  return (u * lam**-0.25) @ u.T


def _problem(seed, rank, diagonal=False, batch=2):
  """Initial statistics [batch, N, N] and a stream of grams [STEPS, batch, N, N].

  The grams are G G^T / rank with G = C^(1/2) Z (Z standard normal, rank
  columns), so the EMA moves from the initial statistic towards C; the two
  are independent random SPD matrices (root distance about 40%).
  """
  rng = np.random.default_rng(seed)

  def spd():
    if diagonal:
      return np.diag(rng.uniform(0.1, 3.0, N))
    a = rng.standard_normal((N, N))
    return a @ a.T / N + 0.1 * np.eye(N)

  inits, grams = [], []
  for _ in range(batch):
    cov = spd()
    inits.append(spd())
    chol = np.linalg.cholesky(cov)
    g = chol @ rng.standard_normal((STEPS, N, rank)) / np.sqrt(rank)
    if diagonal:  # diagonal grams: everything commutes
      g = np.sqrt(np.abs(np.diagonal(g @ np.swapaxes(g, -1, -2), axis1=-2, axis2=-1)))[..., None] * np.eye(N)
    grams.append(g @ np.swapaxes(g, -1, -2))
  return np.stack(inits), np.stack(grams, axis=1)


@functools.partial(jax.jit, static_argnames=("beta_is_none", "symmetrize"))
def _run(root, grams, beta, max_step, beta_is_none, symmetrize):
  def step(r, gram):
    new, used = root_fns.jorge_root_update(r, gram, None if beta_is_none else beta, max_step, symmetrize)
    return new, (new, used)

  return jax.lax.scan(step, root, grams)[1]


def _errors(cov, grams, beta=0.95, max_step=1.0, symmetrize=True):
  """Per-step relative Frobenius errors [STEPS, batch], the roots and the betas used."""
  root0 = np.stack([_np_root(c) for c in cov])
  roots, betas = _run(jnp.asarray(root0, jnp.float32), jnp.asarray(grams, jnp.float32),
                      jnp.float32(beta if beta is not None else 0.0), jnp.float32(max_step),
                      beta is None, symmetrize)
  roots, betas = np.asarray(roots, np.float64), np.asarray(betas, np.float64)
  stat = cov.copy()
  errors = np.zeros(betas.shape)
  for t in range(STEPS):
    stat = betas[t][:, None, None] * stat + (1.0 - betas[t][:, None, None]) * grams[t]
    for b in range(stat.shape[0]):
      exact = _np_root(stat[b])
      errors[t, b] = np.linalg.norm(roots[t, b] - exact) / np.linalg.norm(exact)
  return errors, roots, betas


@pytest.fixture(scope="module")
def full_rank():
  return _problem(0, rank=2 * N)


def test_commuting_stream_is_exact_up_to_truncation():
  cov, grams = _problem(1, rank=2 * N, diagonal=True)
  errors, roots, _ = _errors(cov, grams, beta=0.95)
  # Only the O(||eps X||^3) tail of the binomial series is left: measured 2% at the
  # start (X far from I), 4e-4 once the statistic has settled.
  assert errors[-1].max() < 1e-3, errors[-1]
  assert errors.max() < 0.03, errors.max()
  np.testing.assert_array_equal(roots[..., ~np.eye(N, dtype=bool)], 0.0)


def test_fixed_beta_tracks_the_ema_root(full_rank):
  cov, grams = full_rank
  errors, roots, betas = _errors(cov, grams, beta=0.95)
  # The step clip (||eps X||_F <= 1) acts on a few early steps only.
  assert np.all(betas >= 0.95 - 1e-6) and np.mean(np.isclose(betas, 0.95, rtol=1e-6)) > 0.9
  chex.assert_shape(roots, (STEPS, 2, N, N))
  np.testing.assert_allclose(roots, np.swapaxes(roots, -1, -2), atol=1e-6)
  # Non-commuting statistic and grams (see the docstring for the measured numbers).
  assert errors[-1].max() < 0.03, errors[-1]
  assert errors.max() < 0.08, errors.max()
  # The statistic moved far: its initial root is off by much more than the tracked one.
  drift = [np.linalg.norm(_np_root(cov[b]) - roots[-1, b]) / np.linalg.norm(roots[-1, b]) for b in range(2)]
  assert min(drift) > 8 * errors[-1].max(), (drift, errors[-1])


def test_symmetrizing_halves_the_error(full_rank):
  cov, grams = full_rank
  sym, _, _ = _errors(cov, grams)
  raw, roots, _ = _errors(cov, grams, symmetrize=False)
  assert np.abs(roots[-1] - np.swapaxes(roots[-1], -1, -2)).max() > 1e-4  # the product is not symmetric
  assert sym[-1].max() < 0.5 * raw[-1].min(), (sym[-1], raw[-1])
  assert sym.max() < 0.7 * raw.max(), (sym.max(), raw.max())


def test_adaptive_step(full_rank):
  cov, grams = full_rank
  errors, roots, betas = _errors(cov, grams, beta=None, max_step=1.0)
  # eps = (1 - beta) / beta = 1 / ||X||_F with X = root^4 gram (root before the update).
  root0 = np.stack([_np_root(c) for c in cov])
  previous = np.concatenate([root0[None], roots[:-1]])
  x = np.linalg.matrix_power(previous, 4) @ grams
  np.testing.assert_allclose((1.0 - betas) / betas * np.linalg.norm(x, axis=(-2, -1)), 1.0, rtol=1e-4)
  assert errors[-1].max() < 0.045, errors[-1]


def test_low_rank_grams_stay_bounded_by_the_step_clip():
  cov, grams = _problem(2, rank=1)
  errors, roots, betas = _errors(cov, grams, beta=0.95, max_step=1.0)
  chex.assert_tree_all_finite(roots)
  assert np.all(betas >= 0.95 - 1e-6) and np.any(betas > 0.951)  # clipped on some steps
  assert errors.max() < 0.15, errors.max()


def _np_update(root, gram, beta, max_step, symmetrize):
  """The update's formula in float64 (one factor)."""
  x = np.linalg.matrix_power(root, 4) @ gram
  norm = np.linalg.norm(x)
  eps = max_step / norm if beta is None else min((1 - beta) / beta, max_step / norm)
  b = 1.0 / (1.0 + eps)
  new = root @ (np.eye(len(root)) - eps / 4 * x + 5 * eps**2 / 32 * x @ x)
  if symmetrize:
    new = (new + new.T) / 2
  return b**-0.25 * new, b


@pytest.mark.parametrize("beta, max_step, symmetrize", [(0.95, 1.0, True), (0.95, 1.0, False),
                                                       (None, 1.0, True), (None, 0.5, True),
                                                       (0.5, 0.25, True)])
def test_one_step_matches_the_formula(beta, max_step, symmetrize):
  inits, grams = _problem(4, rank=3)
  roots = np.stack([_np_root(c) for c in inits])
  new, used = root_fns.jorge_root_update(jnp.asarray(roots, jnp.float32), jnp.asarray(grams[0], jnp.float32),
                                       beta, max_step, symmetrize)
  chex.assert_shape(new, (2, N, N))
  chex.assert_shape(used, (2,))
  for b in range(2):
    expected, expected_beta = _np_update(roots[b], grams[0, b], beta, max_step, symmetrize)
    np.testing.assert_allclose(np.asarray(new[b], np.float64), expected, rtol=2e-4,
                               atol=2e-5 * np.abs(expected).max())
    np.testing.assert_allclose(float(used[b]), expected_beta, rtol=1e-5)


def test_zero_gram():
  root = jnp.asarray(_np_root(_problem(3, rank=N)[0][0]), jnp.float32)
  zero = jnp.zeros((N, N))
  new, beta = root_fns.jorge_root_update(root, zero)  # adaptive: nothing to learn, nothing forgotten
  np.testing.assert_array_equal(new, root)
  assert float(beta) == 1.0
  new, beta = root_fns.jorge_root_update(root, zero, beta=0.9)  # L <- 0.9 L
  np.testing.assert_allclose(new, 0.9**-0.25 * root, rtol=1e-6)
  np.testing.assert_allclose(beta, 0.9, rtol=1e-6)


@pytest.mark.parametrize("absolute", [False, True])
@sweep(9)
def test_inverse_root_from_eig_relative_floor_vs_float64(absolute, seed):
  # (lambda + damping + delta * lambda_max)^(-1/4): the floor lifts the small eigenvalues to delta * lambda_max.
  n, epsilon, delta = 32, 1e-12, 1e-6
  rng = np.random.default_rng(seed)
  u = haar(n, rng).astype(np.float32)
  eigvals = rng.permutation(np.logspace(0, -10, n)).astype(np.float32)
  out = root_fns.inverse_root_from_eig(jnp.asarray(u), jnp.asarray(eigvals), jnp.float32(epsilon),
                                       absolute=absolute, relative_floor=delta)
  u64, w64 = u.astype(np.float64), eigvals.astype(np.float64)
  damping = (epsilon if absolute else epsilon * w64.max()) + delta * w64.max()
  ref = (u64 * (w64 + damping) ** -0.25) @ u64.T
  assert rel(out, ref) < 1e-5  # as test_inverse_root_from_eig_vs_float64: the damped condition number is 1e6


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("cond", [1e2, 1e6])
@sweep(10)
def test_inverse_root_factor_from_eig_vs_float64(cond, absolute, seed):
  # W = V d^(-1/8) with W Wᵀ the root of inverse_root_from_eig (same damping, floor included): W is an
  # elementwise scaling of V (u per entry), so W Wᵀ carries only the rounding of one float32 product.
  n, epsilon, delta = 48, 1e-6, 1e-7
  rng = np.random.default_rng(seed)
  u = haar(n, rng).astype(np.float32)
  eigvals = rng.permutation(np.logspace(0, -np.log10(cond), n)).astype(np.float32)
  w = root_fns.inverse_root_factor_from_eig(jnp.asarray(u), jnp.asarray(eigvals), jnp.float32(epsilon),
                                            absolute=absolute, relative_floor=delta)
  chex.assert_shape(w, (n, n))
  u64, w64 = u.astype(np.float64), eigvals.astype(np.float64)
  damping = (epsilon if absolute else epsilon * w64.max()) + delta * w64.max()
  ref = (u64 * (w64 + damping) ** -0.25) @ u64.T
  w_out = np.asarray(w, np.float64)
  assert rel(w_out @ w_out.T, ref) < 1e-5  # as test_inverse_root_from_eig_vs_float64
  formed = root_fns.inverse_root_from_eig(jnp.asarray(u), jnp.asarray(eigvals), jnp.float32(epsilon),
                                          absolute=absolute, relative_floor=delta)
  assert rel(formed, w_out @ w_out.T) < 1e-5
