"""``distributed_shampoo4``'s defaults are Meta's Distributed Shampoo, and the options that make them.

Step for step against the float64 transcription ``reference_meta_shampoo``
(Meta's defaults: the Gram matrices summed from zero, ``beta = 1``; epsilon
1e-12 added as an absolute constant at root time; a vector preconditioned with
one full factor and exponent -1/2; Adam grafting), then the options one by one
against numpy.

Tolerance of the step-for-step comparisons (as in
``test_reference_algorithms``): float32 against float64 on the same
minibatches, the largest parameter deviation relative to the reference's
displacement. Each root is an eigh of a full-rank 30x30 / 40x40 statistic
(relative error O(n u kappa) with u = 6e-8, kappa <= 1e4 here) raised to -1/4,
plus the rounding of summed (beta = 1) statistics; observed <= 3e-4 with the
sum and <= 3e-5 with beta = 0.95, so 3e-3 keeps >= 10x headroom while a missed bias correction,
a relative epsilon, the wrong exponent on the vector or a skipped vector give
O(1e-2..1) deviations (the last test shows one of them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_meta_shampoo as meta
import reference_twins as twins

import optax_shampoo4 as s4
from optax_shampoo4 import options

STEPS = 64
START = 32  # every factor is full rank by then (the bias factor gains rank 1 per step)
ADAM_GRAFTING = ("adam", 0.999, 1e-8)


def _problem(n_in=40, n_out=30, batch=48, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(STEPS, batch, n_in)) * np.logspace(0, -1.5, n_in)
  y = rng.normal(size=(STEPS, batch, n_out)) + 0.5
  params0 = {"w": rng.normal(size=(n_in, n_out)) * 0.1, "b": np.zeros(n_out)}
  return {"x": x, "y": y}, params0


def _loss(params, batch):
  residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return 0.5 * (residual**2).mean()


def _grad64(batches):
  def grad(params, call):
    x, y = batches["x"][call], batches["y"][call]
    residual = x @ params["w"] + params["b"] - y
    return {"w": x.T @ residual / residual.size, "b": residual.sum(0) / residual.size}
  return grad


def _deviation(cfg):
  batches, params0 = _problem()
  history = meta.run_meta(params0, _grad64(batches), STEPS, cfg)
  opt = twins.library_meta_twin(cfg, [p.shape for p in params0.values()])
  return twins.max_relative_deviation(opt, history, params0, _loss, batches)


def test_meta_defaults_need_no_option_beyond_the_schedule():
  # (40, 30) is not merged by Meta (40 * 30 > 1024), the (30,) bias is a vector with a 30 x 30 factor.
  cfg = meta.MetaConfig(grafting=ADAM_GRAFTING)
  assert twins.missing_meta_semantics(cfg, [(40, 30), (30,)]) == []


@pytest.mark.parametrize("b2", [1.0, 0.95], ids=["sum", "ema_bias_corrected"])
def test_distributed_shampoo4_defaults_equal_meta_step_for_step(b2):
  cfg = meta.MetaConfig(lr=1e-2, b2=b2, precondition_frequency=4, start_preconditioning_step=START,
                        grafting=ADAM_GRAFTING)
  deviation = _deviation(cfg)
  assert deviation.max() < 3e-3, deviation


def test_meta_relative_epsilon_would_not_match():
  # The check above has teeth: the paper's relative epsilon (1e-3 * lambda_max) departs from Meta's run.
  batches, params0 = _problem()
  cfg = meta.MetaConfig(lr=1e-2, precondition_frequency=4, start_preconditioning_step=START, grafting=ADAM_GRAFTING)
  history = meta.run_meta(params0, _grad64(batches), STEPS, cfg)
  opt = s4.distributed_shampoo4(1e-2, state_format="fp32", stats_every=1, root_every=4,
                                start_preconditioning_step=START, epsilon=1e-3, epsilon_mode="relative")
  assert twins.max_relative_deviation(opt, history, params0, _loss, batches).max() > 2e-2


# ---------------------------------------------------------------- the options, one by one, against numpy


def _inverse_root64(a, epsilon, p):
  lam, vectors = np.linalg.eigh(np.asarray(a, np.float64) + epsilon * np.eye(a.shape[0]))
  return (vectors * lam ** (-1.0 / p)) @ vectors.T


def _first_direction(tx, grads):
  params = jax.tree.map(jnp.zeros_like, grads)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(np.asarray, updates)


def _unit(x):
  return x / np.linalg.norm(x)


# float32 eigh / products of well-conditioned (damped) 6x6 and 4x4 matrices: errors ~1e-6 relative;
# 1e-4 keeps 100x headroom while the wrong damping / exponent / correction below changes directions by > 1e-2.
RTOL = 1e-4


@pytest.mark.parametrize("state_format", ["fp32", "eigen"])
def test_absolute_epsilon_with_bias_correction_matches_numpy(state_format):
  rng = np.random.default_rng(3)
  g = rng.normal(size=(6, 4)).astype(np.float32)
  beta, epsilon = 0.9, 0.5  # epsilon comparable to the spectrum, so damping and correction both matter
  tx = s4.scale_by_shampoo4(beta=beta, epsilon=epsilon, epsilon_mode="absolute", stats_bias_correction=True,
                            stats_every=1, root_every=1, state_format=state_format, refresh_method="eigh")
  got = _first_direction(tx, {"w": jnp.asarray(g)})["w"]
  g64 = g.astype(np.float64)
  corrected = [(1 - beta) * g64 @ g64.T / (1 - beta), (1 - beta) * g64.T @ g64 / (1 - beta)]
  want = _inverse_root64(corrected[0], epsilon, 4) @ g64 @ _inverse_root64(corrected[1], epsilon, 4)
  np.testing.assert_allclose(got, _unit(want) * np.linalg.norm(g64), rtol=RTOL, atol=RTOL * np.abs(want).max())
  uncorrected = _inverse_root64(corrected[0] * (1 - beta), epsilon, 4) @ g64 @ _inverse_root64(
      corrected[1] * (1 - beta), epsilon, 4)
  assert np.abs(_unit(uncorrected) - _unit(want)).max() > 1e-2  # the correction is not a no-op here


def test_absolute_epsilon_statistics_start_at_zero_in_every_format():
  params = {"w": jnp.zeros((6, 4))}
  for state_format in ("fp32", "eigen", "naive"):
    tx = s4.scale_by_shampoo4(epsilon=1e-3, epsilon_mode="absolute", state_format=state_format)
    for bucket in tx.init(params).factors.values():
      if state_format == "eigen":
        np.testing.assert_array_equal(bucket.eigvals, 0.0)  # eigenvalues 0, basis I
        np.testing.assert_array_equal(bucket.eigvecs, np.broadcast_to(np.eye(bucket.eigvals.shape[-1]),
                                                                      bucket.eigvecs.shape))
      else:
        np.testing.assert_array_equal(s4.factors.load(bucket.stats), 0.0)


def test_beta_one_sums_the_gram_matrices():
  rng = np.random.default_rng(4)
  grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(3)]
  tx = s4.scale_by_shampoo4(beta=1.0, epsilon_mode="absolute", epsilon=0.0, stats_every=1, root_every=1,
                            state_format="fp32")
  state = tx.init({"w": jnp.zeros((5, 3))})
  for g in grads:
    _, state = tx.update({"w": jnp.asarray(g)}, state)
  left = s4.factors.load(state.factors["order5_f32"].stats)[0]
  np.testing.assert_allclose(left, sum(g.astype(np.float64) @ g.T for g in grads), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("state_format", ["fp32", "eigen"])
def test_precondition_1d_gives_a_vector_the_inverse_square_root_of_its_factor(state_format):
  rng = np.random.default_rng(5)
  grads = [rng.normal(size=(4,)).astype(np.float32) for _ in range(3)]
  epsilon = 0.3
  tx = s4.scale_by_shampoo4(beta=1.0, epsilon=epsilon, epsilon_mode="absolute", stats_every=1, root_every=1,
                            state_format=state_format, refresh_method="eigh", precondition_1d=True)
  state = tx.init({"b": jnp.zeros((1, 4))})
  for g in grads:
    updates, state = tx.update({"b": jnp.asarray(g).reshape(1, 4)}, state)
  factor = sum(np.outer(g, g).astype(np.float64) for g in grads)
  g = grads[-1].astype(np.float64)
  want = _unit(_inverse_root64(factor, epsilon, 2) @ g) * np.linalg.norm(g)
  np.testing.assert_allclose(np.asarray(updates["b"]).ravel(), want, rtol=RTOL, atol=RTOL)
  fourth_root = _unit(_inverse_root64(factor, epsilon, 4) @ g)
  assert np.abs(fourth_root - _unit(want)).max() > 1e-2  # the exponent matters here
  paper = s4.scale_by_shampoo4(stats_every=1, root_every=1, state_format=state_format)
  np.testing.assert_array_equal(_first_direction(paper, {"b": jnp.asarray(g)})["b"], g.astype(np.float32))


def test_precondition_1d_plan_blocks_long_vectors():
  plan = s4.partition.make_plan([(1, 7, 1), (2500,), (3, 4)], 1024, 64, True, precondition_1d=True)
  short, long, matrix = plan.leaves
  assert short.matrix_shape == (7, 1) and [(b.rows, b.right) for b in short.blocks] == [((0, 7), None)]
  assert [b.rows for b in long.blocks] == [(0, 1024), (1024, 2048), (2048, 2500)]
  assert all(b.right is None and b.left is not None for b in long.blocks)
  assert matrix.matrix_shape == (3, 4)
  assert s4.partition.make_plan([(7,)], 1024, 64, True).leaves[0].matrix_shape is None


def test_distributed_shampoo4_paper_statistics_are_an_option():
  # The paper's statistic (relative epsilon, EMA from epsilon I, vectors passed through) stays reachable.
  tx = s4.distributed_shampoo4(1e-3, beta=0.95, epsilon=1e-6, epsilon_mode="relative", precondition_1d=False)
  state = tx.init({"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)})
  assert sorted(state[0].factors) == ["order4_f32", "order6_f32"]
  assert float(state[0].factors["order6_f32"].eigvals.max()) == pytest.approx(1e-6)


def test_absolute_roots_shift_a_negative_spectrum_as_meta():
  # A statistic with a (rounding-noise) negative eigenvalue: Meta shifts the spectrum up to epsilon.
  rng = np.random.default_rng(6)
  vectors, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  lam = np.array([4.0, 1.0, 0.3, 1e-3, -2e-3])
  factor = (vectors * lam) @ vectors.T
  want = meta.inverse_root(factor, 1.0, 1e-4, 4)
  got = s4.roots.inverse_root_from_eig(jnp.asarray(vectors, jnp.float32), jnp.asarray(lam, jnp.float32), 1e-4,
                                       absolute=True)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=RTOL * np.abs(want).max())
  assert options.ShampooOptions.from_kwargs(state_format="fp32", epsilon_mode="absolute").root_method == "eigh"


def test_root_method_eigh_needs_a_dense_statistic():
  with pytest.raises(ValueError, match="root_method='eigh'"):
    s4.scale_by_shampoo4(state_format="eigen", root_method="eigh")


# ---------------------------------------------------------------- the 4-bit alias' damping floor


@pytest.mark.parametrize("state_format", ["fp32", "eigen"])
def test_quant_damping_floors_the_eigen_roots_only(state_format):
  # Roots of A + (epsilon + delta * lambda_max) I for the "eigen" format; "fp32" (Meta's twin) ignores delta.
  rng = np.random.default_rng(7)
  g = rng.normal(size=(6, 4)).astype(np.float32)
  epsilon, delta = 1e-12, 0.05  # delta large enough to move the direction by far more than RTOL
  grads = {"w": jnp.asarray(g)}

  def direction(quant_damping):
    tx = s4.scale_by_shampoo4(beta=1.0, epsilon=epsilon, epsilon_mode="absolute", stats_every=1, root_every=1,
                              state_format=state_format, refresh_method="eigh", quant_damping=quant_damping)
    return _first_direction(tx, grads)["w"]

  g64 = g.astype(np.float64)
  stats = [g64 @ g64.T, g64.T @ g64]
  floors = [epsilon + delta * np.linalg.eigvalsh(s).max() for s in stats] if state_format == "eigen" else [epsilon] * 2
  want = _inverse_root64(stats[0], floors[0], 4) @ g64 @ _inverse_root64(stats[1], floors[1], 4)
  got = direction(delta)
  want = _unit(want) * np.linalg.norm(g64)
  atol = RTOL * np.abs(want).max()
  if state_format == "fp32":
    # The 6x6 left statistic has rank 4: float32 rounding leaves components of relative size ~ n u along its null
    # space, which the root floored only at epsilon amplifies by up to (lambda_max / epsilon)^(1/4) = 1.8e3 over the
    # range (measured 9e-4 of the largest entry on an AMD EPYC, under 1e-4 on an Intel Xeon); 10x that bound.
    atol = 10 * 6 * np.finfo(np.float32).eps * (np.linalg.eigvalsh(stats[0]).max() / epsilon) ** 0.25 * np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=atol)
  if state_format == "fp32":
    np.testing.assert_array_equal(got, direction(0.0))
  else:
    assert np.abs(_unit(direction(0.0)) - _unit(got)).max() > 1e-2  # the floor is not a no-op here


def test_distributed_shampoo4_floors_only_its_quantized_format():
  assert options.ShampooOptions.from_kwargs(quant_damping=1e-6).factor_config().quant_damping == 1e-6
  opt = s4.distributed_shampoo4(1e-3)
  assert opt is not None
  with pytest.raises(ValueError, match="quant_damping"):
    s4.distributed_shampoo4(1e-3, quant_damping=-1.0)
