"""Tests for the matmul-only inverse-root update ``roots.jorge_root_update``.

The reference is float64 NumPy: the EMA statistic is followed with the β the
update reports, and its inverse 4th root is taken from ``numpy.linalg.eigh``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_shampoo4 import roots as root_fns

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


# --- root_method="jorge" in scale_by_shampoo4 --------------------------------------------------


@pytest.mark.parametrize("state_format,bits,bound", [
    ("fp32", 4, 0.02), pytest.param("naive", 8, 0.03, marks=pytest.mark.slow),
    pytest.param("naive", 4, 0.2, marks=pytest.mark.slow)])
def test_jorge_root_method_converges_to_damped_statistic_root(state_format, bits, bound):
  """A stationary gradient: the stored root approaches (M + δ‖M‖I)^(-1/4), M = G Gᵀ (float64 numpy).

  Measured after 150 updates: 0.15% (fp32), 1.0% (8-bit root), 16% (4-bit root: re-quantizing the root
  at every update lets its quantization error drift, unlike the paper's root rebuilt from eigenpairs).
  """
  import optax_shampoo4 as s4

  rng = np.random.default_rng(0)
  g = rng.standard_normal((72, 96)).astype(np.float32) / 10
  eps = 1e-3
  tx = s4.scale_by_shampoo4(state_format=state_format, root_method="jorge", stats_every=1, root_every=1,
                            epsilon=eps, beta=0.9, min_quant_order=64, bits=bits)
  params = {"w": jnp.zeros((72, 96))}
  state = tx.init(params)
  assert state.factors["order72_q" if state_format == "naive" else "order72_f32"].stats is None
  step = jax.jit(tx.update)
  for _ in range(150):
    _, state = step({"w": jnp.asarray(g)}, state)
  assert int(state.failed_refreshes) == 0
  bucket = state.factors["order72_q" if state_format == "naive" else "order72_f32"]
  root = np.asarray(s4.factors.load(bucket.root), np.float64)[0]
  m = g.astype(np.float64) @ g.T.astype(np.float64)
  damped = m + eps * np.linalg.norm(m) * np.eye(72)
  lam, vecs = np.linalg.eigh(damped)
  expected = (vecs * lam ** -0.25) @ vecs.T
  error = np.linalg.norm(root - expected) / np.linalg.norm(expected)
  assert error < bound, error


def test_jorge_root_method_validation_and_memory():
  import optax_shampoo4 as s4

  with pytest.raises(ValueError, match="root_method='jorge'"):
    s4.scale_by_shampoo4(root_method="jorge")  # the eigen format keeps eigenvectors, not roots
  shapes = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  jorge = s4.state_nbytes(jax.eval_shape(s4.scale_by_shampoo4(state_format="naive", root_method="jorge").init,
                                         shapes))
  naive = s4.state_nbytes(jax.eval_shape(s4.scale_by_shampoo4(state_format="naive").init, shapes))
  # Jorge keeps one quantized matrix per factor (the root), the naive format two (statistic and root).
  assert jorge["preconditioner"] * 2 == naive["preconditioner"]
