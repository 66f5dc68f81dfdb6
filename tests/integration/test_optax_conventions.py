"""Optax conventions: scale_by_shampoo4 and the aliases inside the optax ecosystem.

The checks of optax's contrib common-test matrix (inject_hyperparams,
MultiSteps, partition/masked, extra arguments, state types under ``lax.cond``,
abstract init, ``map_params``) plus determinism. Compilation dominates the
cost, so every test uses one (12, 12) matrix (both factors in one quantized
bucket, via ``min_quant_order=8, quant_block=4``) next to vectors, and the
three aliases are paired with the three state formats (each format is also
tested on its own through ``scale_by_shampoo4``).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import mark_slow
from jax import lax

import optax_shampoo4 as s4
from optax_shampoo4 import factors as fct

FORMATS = ("eigen", "naive", "fp32")
# T1 = 2, T2 = 3: statistics at steps 2, 4, 6, roots at steps 3 and 6.
SHAMPOO = dict(stats_every=2, root_every=3, min_quant_order=8, quant_block=4)
STEPS = 6
# Arguments that fix shapes or loop lengths; strings, tuples, None and bools are static anyway.
STATIC = ("max_order", "stats_every", "root_every", "bits", "quant_block", "min_quant_order")
# Each alias with the hyperparameters it injects, paired with one state format.
ALIASES = [
    pytest.param("adamw_shampoo4", "eigen", dict(learning_rate=1e-2, b1=0.8, weight_decay=1e-2), id="adamw-eigen"),
    pytest.param("sgdm_shampoo4", "naive", dict(learning_rate=0.1, momentum=0.8, weight_decay=1e-3, nesterov=True),
                 id="sgdm-naive"),
    pytest.param("adagrad_shampoo4", "fp32", dict(learning_rate=0.1, initial_accumulator_value=0.1),
                 id="adagrad-fp32"),
]


def _params():
  return {"w": jnp.linspace(-1.0, 1.0, 144).reshape(12, 12), "b": jnp.ones((12,))}


def _mixed_params():
  """One matrix in each float dtype (they share the order-12 bucket) and an f16 vector."""
  w = jnp.linspace(-1.0, 1.0, 144).reshape(12, 12)
  return {"f32": w, "bf16": w.T.astype(jnp.bfloat16), "f16": (0.5 * w).astype(jnp.float16),
          "b": jnp.ones((12,), jnp.float16)}


def _grads(step, params):
  rng = np.random.default_rng(step)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _signature(tree):
  return jax.tree.structure(tree), [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


def _alias(name, state_format, hparams):
  return getattr(s4, name)(**hparams, state_format=state_format, **SHAMPOO)


def _run(opt, params, steps=STEPS, update=None):
  """[(updates, state)] after each jitted step, applying the updates to ``params``."""
  update = jax.jit(opt.update) if update is None else update
  state = opt.init(params)
  history = []
  for step in range(steps):
    updates, state = update(_grads(step, params), state, params)
    params = optax.apply_updates(params, updates)
    history.append((updates, state))
  return history


def _shampoo(state_format, **kwargs):
  return s4.scale_by_shampoo4(beta=0.9, epsilon=1e-4, state_format=state_format, **SHAMPOO, **kwargs)


@functools.lru_cache(maxsize=None)
def _plain_shampoo(state_format):
  """The plain transform, its compiled update and its trajectory (shared by several tests)."""
  opt = _shampoo(state_format)
  update = jax.jit(opt.update)
  return opt, update, _run(opt, _params(), update=update)


def _assert_same_run(got, want):
  """Same structure and dtypes; values equal up to float rounding (integer leaves exactly).

  A differently compiled program (a traced hyperparameter instead of a
  constant) may round differently by an ulp (XLA contracts multiply-adds
  differently), as optax's own common test allows.
  """
  for (got_updates, got_state), (want_updates, want_state) in zip(got, want, strict=True):
    chex.assert_trees_all_equal_structs(got_state, want_state)
    chex.assert_trees_all_equal_dtypes((got_updates, got_state), (want_updates, want_state))
    # The updates pass through those roots too: a traced beta rounds 1 - beta in float32, a constant in float64
    # (fp32 format: up to 3.0e-6 absolute on 4 of 144 elements). With 4-bit codes such an ulp can flip a code
    # (eigen format: 3.9e-5 on one element, 2e-5 of the update's largest entry): bound the difference by 1e-3 of
    # each update's largest entry (50x headroom; a hyperparameter baked in at trace time moves it by O(1)).
    for got_leaf, want_leaf in zip(jax.tree.leaves(got_updates), jax.tree.leaves(want_updates), strict=True):
      scale = float(np.max(np.abs(want_leaf))) if np.size(want_leaf) else 0.0
      np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=max(3e-5, 1e-3 * scale))
    _assert_state_close(got_state, want_state)


def _assert_state_close(got_state, want_state):
  """The state's eigenpairs and roots amplify those ulps, by how much depends on the CPU's kernels: largest
  relative difference measured 1.3e-5 on an Intel Xeon and 1.8e-4 on an AMD EPYC (the 4-bit roots' scales), so
  float leaves are held to 2e-3 (10x the largest). Where such an ulp moves a value across a rounding boundary
  of its codebook, a code changes by one step: codes may differ by one on at most 1 % of the elements."""
  for got, want in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
    got, want = np.asarray(got), np.asarray(want)
    if np.issubdtype(want.dtype, np.integer):
      steps = np.abs(got.astype(np.int64) - want.astype(np.int64))
      if want.dtype == np.uint8:  # packed 4-bit codes: each half
        steps = np.maximum(np.abs((got & 15).astype(int) - (want & 15)), np.abs((got >> 4).astype(int) - (want >> 4)))
      assert steps.max(initial=0) <= 1 and np.mean(steps > 0) <= 0.01, (steps.max(initial=0), np.mean(steps > 0))
    else:
      np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)


def _stats(bucket):
  return bucket.eigvals if isinstance(bucket, s4.EigenFactors) else fct.load(bucket.stats)


# ----------------------------------------------------------------------------
# inject_hyperparams


@pytest.mark.parametrize("state_format", FORMATS)
def test_inject_hyperparams_scale_by_shampoo4(state_format):
  factory = optax.inject_hyperparams(s4.scale_by_shampoo4, static_args=STATIC)
  injected = factory(beta=0.9, epsilon=1e-4, state_format=state_format, **SHAMPOO)
  state = injected.init(_params())
  assert set(state.hyperparams) == {"beta", "epsilon", "refresh_tol", "quant_damping"}
  traces = []

  def counted_update(*args):
    traces.append(1)
    return injected.update(*args)

  update = jax.jit(counted_update)
  history = _run(injected, _params(), update=update)
  _, _, plain = _plain_shampoo(state_format)
  _assert_same_run([(u, s.inner_state) for u, s in history], plain)

  # The injected values are really used (not baked in at trace time): no recompile, other results.
  params = _params()
  for name, value, step in (("beta", 0.5, 2), ("epsilon", 0.5, 3)):
    state = injected.init(params)
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
    for i in range(step):
      _, state = update(_grads(i, params), state, params)
    (bucket,) = state.inner_state.factors.values()
    (plain_bucket,) = plain[step - 1][1].factors.values()
    if name == "beta":  # step 2 folds the statistics with the new beta
      assert not np.allclose(_stats(bucket), _stats(plain_bucket))
    else:  # step 3 takes the root with the new epsilon from the same statistics
      np.testing.assert_allclose(_stats(bucket), _stats(plain_bucket), rtol=1e-5, atol=1e-6)
      assert not np.allclose(fct.load(bucket.root), fct.load(plain_bucket.root), atol=1e-3)
  assert len(traces) == 1


def _adamw_with_explicit_signature(learning_rate, b1, weight_decay, state_format, stats_every, root_every,
                                   min_quant_order, quant_block):
  """The workaround for aliases: a factory whose signature names the Shampoo options."""
  return s4.adamw_shampoo4(learning_rate, b1=b1, weight_decay=weight_decay, state_format=state_format,
                           stats_every=stats_every, root_every=root_every,
                           min_quant_order=min_quant_order, quant_block=quant_block)


def test_inject_hyperparams_alias_through_explicit_factory():
  hparams = dict(learning_rate=1e-2, b1=0.8, weight_decay=1e-2)
  static = ("stats_every", "root_every", "min_quant_order", "quant_block")
  injected = optax.inject_hyperparams(_adamw_with_explicit_signature, static_args=static)(
      **hparams, state_format="eigen", **SHAMPOO)
  assert set(injected.init(_params()).hyperparams) == {"learning_rate", "b1", "weight_decay"}
  got = _run(injected, _params())
  want = _run(_alias("adamw_shampoo4", "eigen", hparams), _params())
  _assert_same_run([(u, s.inner_state) for u, s in got], want)


@pytest.mark.parametrize("name, state_format, hparams", ALIASES)
def test_inject_hyperparams_alias(name, state_format, hparams):
  injected = optax.inject_hyperparams(getattr(s4, name), static_args=STATIC)(
      **hparams, state_format=state_format, **SHAMPOO)
  state = injected.init(_params())
  # Every continuous argument is injected: the alias's own ones and Shampoo's beta and epsilon.
  assert {k for k, v in hparams.items() if not isinstance(v, bool)} | {"beta", "epsilon"} <= set(
      state.hyperparams)
  assert not set(state.hyperparams) & set(STATIC)
  got = _run(injected, _params())
  want = _run(_alias(name, state_format, hparams), _params())
  _assert_same_run([(u, s.inner_state) for u, s in got], want)


def test_inject_hyperparams_without_static_args():
  """Shape-fixing options default to None and the periods may be traced: no static_args needed."""
  name, state_format, hparams = ALIASES[0].values
  schedule = dict(stats_every=2, root_every=3)
  injected = optax.inject_hyperparams(getattr(s4, name))(**hparams, **schedule, state_format=state_format)
  state = injected.init(_params())
  # Given explicitly, T1/T2 are injected too (traced in update) and the schedule still works;
  # explicitly given shape-fixing values need static_args (see the next test).
  assert {"stats_every", "root_every"} <= set(state.hyperparams)
  got = _run(injected, _params())
  want = _run(getattr(s4, name)(**hparams, **schedule, state_format=state_format), _params())
  _assert_same_run([(u, s.inner_state) for u, s in got], want)


def test_injected_shape_fixing_value_names_the_argument_and_static_args():
  with pytest.raises(ValueError, match="max_order.*static_args"):
    optax.inject_hyperparams(s4.adamw_shampoo4)(learning_rate=1e-3, max_order=512).init(_params())
  # Listed in static_args, the same value works.
  injected = optax.inject_hyperparams(s4.adamw_shampoo4, static_args=("max_order",))(
      learning_rate=1e-3, max_order=512)
  injected.init(_params())


# ----------------------------------------------------------------------------
# Wrappers: MultiSteps, partition, masked


@pytest.mark.parametrize("name, state_format, hparams", mark_slow(ALIASES, "adamw-eigen"))
def test_multisteps_accumulates_in_f32_and_bf16(name, state_format, hparams):
  k = 3
  params = {"w": jnp.linspace(-1.0, 1.0, 144).reshape(12, 12),
            "h": jnp.linspace(1.0, -1.0, 144).reshape(12, 12).astype(jnp.bfloat16),
            "b": jnp.ones((12,), jnp.bfloat16)}
  opt = optax.MultiSteps(_alias(name, state_format, hparams), every_k_schedule=k)
  state = opt.init(params)
  signature = _signature(state)
  update = jax.jit(opt.update)
  for step in range(1, 2 * k + 1):
    updates, state = update(_grads(step, params), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    assert _signature(state) == signature, step
    if step % k:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    else:
      chex.assert_tree_all_finite(updates)
      assert all(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates)), step
    params = optax.apply_updates(params, updates)
  shampoo_state = state.inner_opt_state[0]
  assert int(shampoo_state.count) == 2  # the inner optimizer ran once per k steps
  assert int(shampoo_state.nonfinite_steps) == 0 and int(shampoo_state.failed_refreshes) == 0


def _four_leaves():
  w = jnp.linspace(-1.0, 1.0, 144).reshape(12, 12)
  return {"w": w, "v": w.T * 0.5, "b": jnp.ones((12,)), "s": jnp.asarray(2.0)}


@pytest.mark.slow
def test_partition_shampoo_on_matrices_adam_on_the_rest():
  params = _four_leaves()
  labels = lambda p: jax.tree.map(lambda x: "shampoo" if x.ndim >= 2 else "adam", p)  # noqa: E731
  opt = optax.partition({"shampoo": s4.adamw_shampoo4(1e-2, **SHAMPOO), "adam": optax.adam(1e-2)}, labels)
  adam = optax.adam(1e-2)
  rest = lambda t: {"b": t["b"], "s": t["s"]}  # noqa: E731
  state, adam_state = opt.init(params), adam.init(rest(params))
  update, adam_update = jax.jit(opt.update), jax.jit(adam.update)
  for step in range(4):
    grads = _grads(step, params)
    updates, state = update(grads, state, params)
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    want, adam_state = adam_update(rest(grads), adam_state, rest(params))
    chex.assert_trees_all_close(rest(updates), want, rtol=1e-6, atol=1e-7)
    params = optax.apply_updates(params, updates)
  shampoo_state = state.inner_states["shampoo"].inner_state[0]
  assert isinstance(shampoo_state, s4.ScaleByShampoo4State)
  assert list(shampoo_state.factors) == ["order12_q"]
  assert shampoo_state.factors["order12_q"].eigvals.shape == (4, 12)  # 2 factors each for w and v
  assert int(shampoo_state.count) == 4
  adam_mu = state.inner_states["adam"].inner_state[0].mu
  assert isinstance(adam_mu["w"], optax.MaskedNode) and isinstance(adam_mu["v"], optax.MaskedNode)
  assert adam_mu["b"].shape == (12,)


def test_masked_state_holds_factors_of_unmasked_leaves_only():
  params = _four_leaves()
  mask = {"w": True, "v": False, "b": False, "s": False}
  opt = optax.masked(s4.adamw_shampoo4(1e-2, **SHAMPOO), mask)
  state = opt.init(params)
  shampoo_state, adam_state = state.inner_state[0], state.inner_state[1]
  assert shampoo_state.factors["order12_q"].eigvals.shape == (2, 12)  # w only, not v
  assert all(isinstance(adam_state.mu[k], optax.MaskedNode) for k in ("v", "b", "s"))
  assert adam_state.mu["w"].shape == (12, 12)
  update = jax.jit(opt.update)
  for step in range(4):
    grads = _grads(step, params)
    updates, state = update(grads, state, params)
    chex.assert_tree_all_finite(updates)
    for k in ("v", "b", "s"):  # masked leaves pass through untouched
      np.testing.assert_array_equal(updates[k], grads[k])
    assert not np.allclose(updates["w"], grads["w"])
    params = optax.apply_updates(params, updates)
  assert int(state.inner_state[0].count) == 4


# ----------------------------------------------------------------------------
# Calling conventions and state types


@pytest.mark.parametrize("name, state_format, hparams", ALIASES)
def test_extra_args_through_chain_without_recompiling(name, state_format, hparams):
  opt = optax.chain(_alias(name, state_format, hparams), optax.clip_by_global_norm(10.0))
  params = _params()
  state = opt.init(params)
  traces = []

  @jax.jit
  def step(params, state, grads, loss):
    traces.append(1)
    updates, state = opt.update(grads, state, params, value=loss, foo="bar", loss_fn=None)
    return optax.apply_updates(params, updates), state

  for i in range(3):
    params, state = step(params, state, _grads(i, params), jnp.float32(i))
  assert len(traces) == 1
  assert int(state[0][0].count) == 3
  chex.assert_tree_all_finite(params)


@pytest.mark.parametrize("name, state_format, hparams", mark_slow(ALIASES, "adamw-eigen"))
def test_state_types_stable_under_lax_cond(name, state_format, hparams):
  """f32, bf16 and f16 parameters: both cond branches must agree on every type."""
  opt = _alias(name, state_format, hparams)
  params = _mixed_params()
  state = opt.init(params)
  signature = _signature(state)

  @jax.jit
  def step(params, state, grads, take_step):
    updates, state = lax.cond(take_step, lambda: opt.update(grads, state, params),
                              lambda: (grads, state))
    return optax.apply_updates(params, updates), state

  for i, take_step in enumerate([True, True, False, True]):
    new_params, new_state = step(params, state, _grads(i, params), take_step)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
    assert _signature(new_state) == signature
    if not take_step:
      chex.assert_trees_all_equal(new_state, state)
    params, state = new_params, new_state
  chex.assert_tree_all_finite((params, state))
  assert int(state[0].count) == 3


@pytest.mark.parametrize("name, state_format, hparams", ALIASES)
@pytest.mark.parametrize("wrap", ["none", "multisteps"])
def test_init_on_shape_dtype_structs(name, state_format, hparams, wrap):
  opt = _alias(name, state_format, hparams)
  if wrap == "multisteps":
    opt = optax.MultiSteps(opt, every_k_schedule=2)
  params = _mixed_params()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert _signature(jax.eval_shape(opt.init, abstract)) == _signature(opt.init(params))


def test_map_params_maps_parameter_shaped_parts_and_keeps_the_factors():
  """optax.tree.map_params re-runs init on a placeholder: Adam's moments are mapped, the factor
  buckets (sized from shapes the placeholder hides) come back untouched."""
  opt = s4.adamw_shampoo4(1e-2, **SHAMPOO)
  state = opt.init(_params())
  mapped = optax.tree.map_params(opt, lambda p: p + 1.0, state)
  chex.assert_trees_all_equal(mapped[0].factors, state[0].factors)
  chex.assert_trees_all_close(mapped[1].mu, jax.tree.map(lambda p: p + 1.0, state[1].mu))
  # With transform_non_params, the bucket dictionary is handed over whole.
  specs = optax.tree.map_params(opt, lambda p: "param", state, transform_non_params=lambda x: "other")
  assert specs[0].factors == "other" and specs[1].mu == {"w": "param", "b": "param"}
  # Per-leaf specs of the factors: a tree map over the (abstract) state.
  shapes = jax.tree.map(lambda x: x.shape, jax.eval_shape(opt.init, _params()))
  assert shapes[0].factors["order12_q"].eigvals == (2, 12)


@pytest.mark.parametrize("state_format", FORMATS)
def test_two_runs_are_bit_identical(state_format):
  opt, update, history = _plain_shampoo(state_format)
  other = _shampoo(state_format)
  params = _params()
  chex.assert_trees_all_equal(other.init(params), opt.init(params))
  # A second optimizer built from the same arguments compiles to the same program ...
  args = (_grads(0, params), opt.init(params))
  assert jax.jit(other.update).lower(*args).as_text() == update.lower(*args).as_text()
  # ... and running it again from scratch reproduces every update and state bit for bit.
  chex.assert_trees_all_equal(_run(opt, params, update=update), history)
