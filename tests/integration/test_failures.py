"""Failure policy under jit, degenerate shapes, and argument errors.

The policy (``scale_by_shampoo4``): a step whose gradient holds a NaN or Inf in
any leaf returns an all-zero update, leaves the statistics untouched and is
counted in ``nonfinite_steps`` (and ``skipped_stats`` on a statistics step); a
refresh whose result is not finite keeps that factor's previous value and is
counted in ``failed_refreshes``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mark_slow

import optax_shampoo4 as s4
from optax_shampoo4 import factors as fct
from optax_shampoo4 import quantization as qz

FORMATS = ("eigen", "naive", "fp32")
# T1 = 2, T2 = 3: step 1 plain, 2 statistics, 3 root, 4 statistics, 5 plain, 6 both, 7 plain.
SCHEDULE = dict(stats_every=2, root_every=3, min_quant_order=8, quant_block=4)
STEPS = 7
STEP_KINDS = {2: "stats", 3: "root", 5: "plain", 6: "stats+root"}


def _params():
  return {"w": jnp.zeros((12, 12)), "b": jnp.zeros((12,)), "s": jnp.zeros(())}


def _grads(step, params=None, scale=1.0):
  params = _params() if params is None else params
  rng = np.random.default_rng(step)
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype), params)


@functools.lru_cache(maxsize=None)
def _update(state_format):
  tx = s4.scale_by_shampoo4(state_format=state_format, **SCHEDULE)
  return tx, jax.jit(tx.update)


def _bucket(state):
  (bucket,) = state.factors.values()
  return bucket


def _statistics(bucket):
  """The statistic part of a bucket (everything but the root), as stored."""
  if isinstance(bucket, s4.EigenFactors):
    return bucket.eigvecs, bucket.eigvals
  return bucket.stats


def _run(state_format, grads_at=_grads):
  """[(grads, updates, state before, state after)] for steps 1..STEPS."""
  tx, update = _update(state_format)
  state = tx.init(_params())
  history = []
  for step in range(1, STEPS + 1):
    grads = grads_at(step)
    updates, new_state = update(grads, state)
    history.append((grads, updates, state, new_state))
    state = new_state
  return history


@functools.lru_cache(maxsize=None)
def _clean_run(state_format):
  return _run(state_format)


def _trees_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _assert_continues_finite(history, after_step):
  for _, updates, _, state in history[after_step:]:
    chex.assert_tree_all_finite((updates, state))


# ----------------------------------------------------------------------------
# Non-finite gradients


@pytest.mark.parametrize("state_format", FORMATS)
@pytest.mark.parametrize("bad_step", sorted(STEP_KINDS), ids=[STEP_KINDS[s] for s in sorted(STEP_KINDS)])
@pytest.mark.parametrize("leaf, value", [("w", np.nan), ("w", np.inf), ("b", -np.inf), ("s", np.nan)])
def test_non_finite_gradient_gives_zero_update_and_keeps_statistics(state_format, bad_step, leaf, value):
  def grads_at(step):
    grads = _grads(step)
    if step == bad_step:
      grads[leaf] = grads[leaf].at[(0,) * grads[leaf].ndim].set(value)
    return grads

  history = _run(state_format, grads_at)
  clean = _clean_run(state_format)
  grads, updates, before, after = history[bad_step - 1]
  # Every leaf, preconditioned or passed through, gets an exact zero of its shape and dtype.
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
  chex.assert_trees_all_equal(_statistics(_bucket(after)), _statistics(_bucket(before)))
  if bad_step == 3:  # the root refresh still runs, from the untouched statistics: as without the NaN
    chex.assert_trees_all_equal(after.factors, clean[2][3].factors)
  elif "root" not in STEP_KINDS[bad_step]:
    chex.assert_trees_all_equal(after.factors, before.factors)
  assert int(after.count) == bad_step
  assert int(after.nonfinite_steps) == 1
  assert int(after.skipped_stats) == int("stats" in STEP_KINDS[bad_step])
  assert int(after.failed_refreshes) == 0
  _assert_continues_finite(history, bad_step)
  final = history[-1][3]
  assert int(final.nonfinite_steps) == 1 and int(final.failed_refreshes) == 0
  if bad_step < 6:  # a later statistics step still folds new gradients in
    assert not _trees_equal(_statistics(_bucket(final)), _statistics(_bucket(after)))


@pytest.mark.parametrize("state_format", FORMATS)
def test_counters_add_up_over_several_bad_steps(state_format):
  bad = {2: np.nan, 4: np.inf, 5: np.nan}  # two statistics steps and a plain one

  def grads_at(step):
    grads = _grads(step)
    if step in bad:
      grads["w"] = grads["w"].at[3, 4].set(bad[step])
    return grads

  history = _run(state_format, grads_at)
  for step, (_, updates, _, state) in enumerate(history, start=1):
    if step in bad:
      assert all(not np.any(u) for u in jax.tree.leaves(updates)), step
    else:
      chex.assert_tree_all_finite(updates)
      assert np.any(updates["w"]), step
    assert int(state.nonfinite_steps) == sum(s <= step for s in bad)
    assert int(state.skipped_stats) == sum(s <= step and s % 2 == 0 for s in bad)
  # Statistics only moved at step 6, the one statistics step with a finite gradient.
  first_root = history[2][3]
  chex.assert_trees_all_equal(_statistics(_bucket(history[4][3])), _statistics(_bucket(first_root)))
  assert not _trees_equal(_statistics(_bucket(history[5][3])), _statistics(_bucket(first_root)))
  assert int(history[-1][3].failed_refreshes) == 0


# ----------------------------------------------------------------------------
# Non-finite refreshes


def _huge_at_step_2(step):
  """Finite gradients, but 1e20 at step 2: G Gᵀ overflows float32 (max ~3.4e38)."""
  return _grads(step, scale=1e20 if step == 2 else 1.0)


@pytest.mark.parametrize("state_format", FORMATS)
def test_overflowing_statistics_are_rejected_and_counted(state_format):
  history = _run(state_format, _huge_at_step_2)
  grads, updates, before, after = history[1]
  chex.assert_tree_all_finite(grads)
  assert int(after.nonfinite_steps) == 0 and int(after.skipped_stats) == 0  # the gradient is finite
  assert int(after.failed_refreshes) == 2  # both factors of "w" (left and right) rejected
  chex.assert_trees_all_equal(after.factors, before.factors)  # each kept its previous value
  chex.assert_tree_all_finite(after)
  for name in ("b", "s"):  # passthrough leaves are returned as they are
    np.testing.assert_array_equal(updates[name], grads[name])
  _assert_continues_finite(history, 2)
  final = history[-1][3]
  assert int(final.failed_refreshes) == 2 and int(final.nonfinite_steps) == 0
  assert not _trees_equal(_statistics(_bucket(final)), _statistics(_bucket(after)))


def test_finite_gradient_too_large_for_the_statistics_gives_finite_update():
  history = _run("fp32", _huge_at_step_2)
  chex.assert_tree_all_finite(history[1][1])


def _corrupt_first_factor(bucket):
  """Sets the statistic of factor 0 of a bucket to NaN (as a corrupted checkpoint would)."""
  if isinstance(bucket, s4.EigenFactors):
    return bucket._replace(eigvals=bucket.eigvals.at[0].set(jnp.nan))
  if isinstance(bucket.stats, s4.OffDiagQuantized):
    return bucket._replace(stats=bucket.stats._replace(diag=bucket.stats.diag.at[0].set(jnp.nan)))
  return bucket._replace(stats=bucket.stats.at[0].set(jnp.nan))


@pytest.mark.parametrize("state_format", FORMATS)
def test_non_finite_root_keeps_previous_root(state_format):
  _, update = _update(state_format)
  state = _clean_run(state_format)[1][3]  # after step 2 (statistics), before the first root
  (name,) = state.factors
  state = state._replace(factors={name: _corrupt_first_factor(state.factors[name])})
  before = fct.load(state.factors[name].root)
  updates, state = update(_grads(3), state)  # step 3: root refresh only
  after = fct.load(state.factors[name].root)
  np.testing.assert_array_equal(after[0], before[0])  # rejected: the previous root (I) is kept
  assert not np.allclose(after[1], before[1], atol=1e-3)  # the healthy factor was refreshed
  assert int(state.failed_refreshes) == 1 and int(state.nonfinite_steps) == 0
  chex.assert_tree_all_finite(updates)
  chex.assert_tree_all_finite(state.factors[name].root)
  # The corrupted statistic cannot recover (beta * NaN), so each later refresh of it fails too.
  updates, state = update(_grads(4), state)  # step 4: statistics
  assert int(state.failed_refreshes) == 2
  chex.assert_tree_all_finite(updates)


# ----------------------------------------------------------------------------
# Degenerate shapes


def _degenerate_params():
  """max_order=13: prime orders 13 and 7; 27 = 13 + 13 + 1 and 15 = 13 + 2 leave orders 1 and 2."""
  return {
      "prime": jnp.zeros((13, 7)),
      "split": jnp.zeros((27, 15)),
      "scalar": jnp.zeros(()),
      "empty": jnp.zeros((0, 5)),
      "empty3": jnp.zeros((2, 0, 3)),
      "token": jnp.zeros((1, 1, 6)),
      "bias": jnp.zeros((7,)),
  }


@pytest.mark.parametrize("state_format", mark_slow(FORMATS, "eigen", "naive"))
def test_degenerate_shapes(state_format):
  params = _degenerate_params()
  tx = s4.scale_by_shampoo4(max_order=13, stats_every=1, root_every=2, min_quant_order=7, quant_block=4,
                            state_format=state_format)
  state = tx.init(params)
  quantized = "_f32" if state_format == "fp32" else "_q"
  assert set(state.factors) == {"order1_f32", "order2_f32", "order7" + quantized, "order13" + quantized}
  update = jax.jit(tx.update)
  for step in range(1, 6):
    grads = _grads(step, params)
    if step == 5:
      grads["prime"] = grads["prime"].at[0, 0].set(jnp.nan)
    updates, state = update(grads, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
    if step == 5:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
      break
    chex.assert_tree_all_finite((updates, state))
    for name in ("scalar", "empty", "empty3", "token", "bias"):  # passthrough
      np.testing.assert_array_equal(updates[name], grads[name])
    for name in ("prime", "split"):  # grafted to the gradient norm
      np.testing.assert_allclose(jnp.linalg.norm(updates[name]), jnp.linalg.norm(grads[name]), rtol=1e-5)
    if step >= 2:  # preconditioned from the first root on
      assert not np.allclose(updates["split"], grads["split"], atol=1e-3)
  assert int(state.failed_refreshes) == 0 and int(state.nonfinite_steps) == 1


@pytest.mark.parametrize("params", [{}, {"empty": jnp.zeros((0, 5)), "s": jnp.zeros(()), "v": jnp.zeros((4,))}],
                         ids=["empty-tree", "no-matrix"])
def test_tree_without_preconditioned_leaves(params):
  tx = s4.scale_by_shampoo4(stats_every=1, root_every=1)
  state = tx.init(params)
  assert state.factors == {}
  update = jax.jit(tx.update)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  updates, state = update(grads, state)
  chex.assert_trees_all_equal(updates, grads)
  if params:
    grads["v"] = grads["v"].at[1].set(jnp.inf)
    updates, state = update(grads, state)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
  assert int(state.count) == (2 if params else 1) and int(state.nonfinite_steps) == int(bool(params))


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.bool_, jnp.uint8, jnp.int16])
def test_non_float_parameters_rejected_at_init_naming_the_leaf(dtype):
  params = {"layer": {"kernel": jnp.zeros((4, 4)), "extra": jnp.zeros((3, 3), dtype)}}
  pattern = r"\['layer'\]\['extra'\].*" + jnp.dtype(dtype).name
  with pytest.raises(TypeError, match=pattern):
    s4.adamw_shampoo4(1e-3).init(params)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  with pytest.raises(TypeError, match=pattern):
    jax.eval_shape(s4.scale_by_shampoo4().init, abstract)


# ----------------------------------------------------------------------------
# Argument errors (those not covered by test_transform, test_alias, test_quantization, test_linalg)


def _one_device_mesh():
  return jax.make_mesh((1,), ("data",))


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: s4.scale_by_shampoo4(mesh="cpu"), TypeError, "mesh"),
        (lambda: s4.scale_by_shampoo4(mesh=_one_device_mesh(), mesh_axis="model"), ValueError, "mesh_axis"),
        (lambda: s4.scale_by_shampoo4(mesh=_one_device_mesh(), mesh_axis=None), ValueError, "mesh_axis"),
        (lambda: s4.scale_by_shampoo4(beta=None), TypeError, "beta"),
        (lambda: s4.scale_by_shampoo4(beta=float("inf")), ValueError, "beta"),
        (lambda: s4.scale_by_shampoo4(epsilon=jnp.ones(3)), TypeError, "epsilon"),
        (lambda: s4.scale_by_shampoo4(epsilon=1e-6 + 1j), TypeError, "epsilon"),
        (lambda: s4.scale_by_shampoo4(epsilon=float("inf")), ValueError, "epsilon"),
        (lambda: s4.scale_by_shampoo4(max_order=True), ValueError, "max_order"),
        (lambda: s4.scale_by_shampoo4(max_order=64.0), ValueError, "max_order"),
        (lambda: s4.scale_by_shampoo4(stats_every=-3), ValueError, "stats_every"),
        (lambda: s4.scale_by_shampoo4(quant_block=True), ValueError, "quant_block"),
        (lambda: s4.scale_by_shampoo4(min_quant_order="64"), ValueError, "min_quant_order"),  # None = default
        (lambda: s4.scale_by_shampoo4(bjorck_steps="14"), ValueError, "bjorck_steps"),
        (lambda: s4.scale_by_shampoo4(bjorck_steps=(True, 4)), ValueError, "bjorck_steps"),
        (lambda: s4.scale_by_shampoo4(bjorck_steps=(1, 2, 3)), ValueError, "bjorck_steps"),
        (lambda: s4.scale_by_shampoo4(state_format=None), ValueError, "state_format"),
        (lambda: s4.scale_by_shampoo4(mapping=None), ValueError, "mapping"),
        (lambda: s4.scale_by_shampoo4(bits=True), ValueError, "bits"),
        (lambda: s4.scale_by_shampoo4(root_method="svd"), ValueError, "root_method"),
        (lambda: s4.scale_by_shampoo4(state_format="fp32", root_method="eigen"), ValueError, "root_method"),
        (lambda: s4.scale_by_shampoo4(stat_every=10), TypeError, "stat_every"),
        (lambda: s4.adamw_shampoo4(1e-3, stat_every=10), TypeError, "stat_every"),
        (lambda: s4.adamw_shampoo4(jnp.ones(2)), TypeError, "learning_rate"),
        (lambda: s4.adamw_shampoo4(None), TypeError, "learning_rate"),
        (lambda: s4.adamw_shampoo4(b1="x"), TypeError, "b1"),
        (lambda: s4.adamw_shampoo4(mesh=3), TypeError, "mesh"),
        (lambda: s4.adamw_shampoo4(epsilon=-1.0), ValueError, "epsilon"),
        (lambda: s4.sgdm_shampoo4(weight_decay=-1.0), ValueError, "weight_decay"),
        (lambda: s4.sgdm_shampoo4(momentum=None), TypeError, "momentum"),
        (lambda: s4.sgdm_shampoo4(nesterov=1), TypeError, "nesterov"),
        (lambda: s4.sgdm_shampoo4(-0.1), ValueError, "learning_rate"),
        (lambda: s4.sgdm_shampoo4(state_format="int4"), ValueError, "state_format"),
        (lambda: s4.adagrad_shampoo4(float("nan")), ValueError, "learning_rate"),
        (lambda: s4.adagrad_shampoo4(eps=-1.0), ValueError, "eps"),
        (lambda: s4.adagrad_shampoo4(initial_accumulator_value="a"), TypeError, "initial_accumulator_value"),
        (lambda: s4.adagrad_shampoo4(max_order=0), ValueError, "max_order"),
        (lambda: qz.codebook(mapping=None), ValueError, "mapping"),
        (lambda: qz.codebook(bits=None), ValueError, "bits"),
        (lambda: qz.quantize(jnp.ones((2, 8)), mapping=None), ValueError, "mapping"),
        (lambda: qz.quantize_offdiag(jnp.eye(4), mapping="x"), ValueError, "mapping"),
        (lambda: qz.quantize_offdiag(jnp.eye(4), bits=2), ValueError, "bits"),
        (lambda: qz.quantize_offdiag(jnp.eye(4), block=3), ValueError, "block"),
    ],
)
def test_bad_arguments_name_the_argument(make, error, name):
  with pytest.raises(error, match=name):
    make()


@pytest.mark.parametrize(
    "make",
    [lambda: qz.codebook("linear2", 8.0), lambda: qz.quantize(jnp.ones((2, 8)), bits=8.0),
     lambda: s4.scale_by_shampoo4(bits=4.0)],
    ids=["codebook", "quantize", "scale_by_shampoo4"])
def test_float_bits_rejected(make):
  with pytest.raises(ValueError, match="bits"):
    make()
