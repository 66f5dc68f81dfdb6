"""Tests of ``optax_shampoo4/moments.py``: Adam / momentum / Adagrad with 8- and 4-bit moments.

Training runs compare with float32 optax on an MLP on the digits data set; the storage schemes themselves are
tested in ``test_moment_storage.py``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax import lax

import optax_shampoo4 as s4

M = s4.moments
MS = s4.moment_storage
KEY = jax.random.PRNGKey(0)
SHAMPOO = dict(stats_every=2, root_every=3, min_quant_order=8, quant_block=4)
STATIC = ("max_order", "stats_every", "root_every", "bits", "quant_block", "min_quant_order")


# ---------------------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.slow
def test_bits_none_is_optax_and_small_tensors_match_optax():
  assert isinstance(M.scale_by_adam(bits=None).init({"w": jnp.zeros(3)}), optax.ScaleByAdamState)
  params = {"w": jnp.linspace(-1, 1, 100).reshape(10, 10), "b": jnp.ones(10)}
  for ours, theirs in [(M.scale_by_adam(0.8, 0.99, 1e-6, bits=8), optax.scale_by_adam(0.8, 0.99, 1e-6)),
                       (M.trace(0.9, nesterov=True, bits=4), optax.trace(0.9, nesterov=True)),
                       (M.scale_by_rss(0.1, bits=8), optax.scale_by_rss(0.1))]:
    state, ref_state = ours.init(params), theirs.init(params)
    for i in range(3):
      grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params)
      got, state = ours.update(grads, state)
      want, ref_state = theirs.update(grads, ref_state)
      chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_invalid_arguments_raise_value_errors_naming_them():
  for bad in (3, 16, 8.0, True, "8", jnp.asarray(8)):
    with pytest.raises(ValueError, match="bits"):
      M.scale_by_adam(bits=bad)
    with pytest.raises(ValueError, match="moment_bits"):
      s4.adamw_shampoo4(moment_bits=bad)
  with pytest.raises(ValueError, match="moment_bits"):
    s4.sgdm_shampoo4(moment_bits=2)
  with pytest.raises(ValueError, match="moment_bits"):
    s4.adagrad_shampoo4(moment_bits=0)
  with pytest.raises(ValueError, match="b2"):
    M.scale_by_adam(b2=1.0)
  with pytest.raises(ValueError, match="kind"):
    MS.store_moment(jnp.ones(8), 8, kind="third")


# An MLP on 256 digits: two 64x64-or-larger weights are quantized, the output layer (640) stays float32.
@pytest.fixture(scope="module")
def digits_problem():
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x, labels = jnp.asarray(x[:256] / 16.0, jnp.float32), jax.nn.one_hot(y[:256], 10)
  k1, k2, k3 = jax.random.split(KEY, 3)
  params = {"w1": jax.random.normal(k1, (64, 96)) / 8, "b1": jnp.zeros(96),
            "w2": jax.random.normal(k2, (96, 64)) / np.sqrt(96), "w3": jax.random.normal(k3, (64, 10)) / 8}

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy(jnp.tanh(h @ p["w2"]) @ p["w3"], labels).mean()

  def train(opt, steps=150):
    def body(carry, _):
      p, s = carry
      value, grads = jax.value_and_grad(loss)(p)
      updates, s = opt.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), value

    (_, state), losses = jax.jit(lambda p: lax.scan(body, (p, opt.init(p)), None, length=steps))(params)
    return np.asarray(losses), state

  return train


@pytest.fixture(scope="module")
def adam_runs(digits_problem):
  return {bits: digits_problem(optax.chain(M.scale_by_adam(bits=bits), optax.scale_by_learning_rate(3e-3)))
          for bits in (None, 8, 4)}


@pytest.mark.slow
def test_quantized_adam_tracks_float32_adam(adam_runs):
  reference = adam_runs[None][0]
  assert reference[-1] < 0.1 * reference[0]  # the problem is learned
  # Stated bounds on the final loss ratio vs float32 Adam: 8 bits within 5%, 4 bits within 25%.
  for bits, bound in ((8, 0.05), (4, 0.25)):
    losses, state = adam_runs[bits]
    assert np.all(np.isfinite(losses))
    assert abs(losses[-1] / reference[-1] - 1) < bound, (bits, losses[-1], reference[-1])
    adam_state = state[0]
    assert adam_state.mu["w1"].dtype == jnp.uint8 and adam_state.mu["w3"].dtype == jnp.float32
    assert int(adam_state.nonfinite_count) == 0


@pytest.mark.slow
def test_quantized_momentum_and_adagrad_train(digits_problem, adam_runs):
  start = adam_runs[None][0][0]
  for opt in (optax.chain(M.trace(0.9, bits=8), optax.scale_by_learning_rate(0.3)),
              optax.chain(M.scale_by_rss(0.0, bits=8), optax.scale_by_learning_rate(0.03))):
    losses, _ = digits_problem(opt, steps=80)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.3 * start


@pytest.mark.parametrize("bits", [pytest.param(4, marks=pytest.mark.slow), 8])
def test_bf16_params_keep_their_dtype(bits):
  params = {"w": jnp.ones((64, 80), jnp.bfloat16), "b": jnp.ones((80,), jnp.bfloat16)}
  grads = jax.tree.map(lambda p: p * 0.5, params)
  opts = (M.scale_by_adam(bits=bits), M.trace(0.9, bits=bits), M.scale_by_rss(bits=bits))
  states = [opt.init(params) for opt in opts]
  results = jax.jit(lambda states: [opt.update(grads, s) for opt, s in zip(opts, states)])(states)
  for (updates, new_state), state in zip(results, states):
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  np.testing.assert_allclose(np.asarray(results[0][0]["w"], np.float32), 1.0, rtol=1e-2)  # Adam's first step
  np.testing.assert_allclose(np.asarray(results[2][0]["w"], np.float32), 0.5 / np.sqrt(0.25 + 0.1), rtol=2e-2)


def test_nonfinite_gradient_keeps_the_stored_moments():
  opt = M.scale_by_adam(bits=8)
  params = {"w": jnp.zeros((64, 128)), "v": jnp.zeros((64, 128))}
  update = jax.jit(opt.update)
  good = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  _, state = update(good, opt.init(params))
  bad = {"w": good["w"].at[3, 4].set(jnp.nan), "v": good["v"].at[0, 0].set(1e30)}  # 1e30 ** 2 = inf
  updates, new_state = update(bad, state)
  assert np.isnan(np.asarray(updates["w"])).any()  # the failure is visible, as in optax
  chex.assert_trees_all_equal(new_state[1:-1], state[1:-1])  # codes and scales of mu and nu
  assert int(new_state.nonfinite_count) == 1 and int(new_state.count) == 2
  updates, after = update(good, new_state)
  assert np.all(np.isfinite(np.asarray(updates["w"]))) and int(after.nonfinite_count) == 1


@pytest.mark.slow
def test_state_is_stable_under_lax_cond():
  params = {"w": jnp.linspace(-1, 1, 64 * 80).reshape(64, 80), "b": jnp.ones(80)}
  grads = jax.tree.map(jnp.cos, params)
  # The Adam alias (with Shampoo), and momentum and Adagrad moments on their own.
  for opt in (s4.adamw_shampoo4(moment_bits=4, **SHAMPOO), optax.chain(M.trace(0.9, bits=4), M.scale_by_rss(bits=8))):
    state = opt.init(params)
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(state))
    step = jax.jit(lambda s, do_update, opt=opt: lax.cond(do_update, lambda s: opt.update(grads, s, params)[1],
                                                         lambda s: s, s))
    for i in range(3):
      new_state = step(state, i != 1)
      chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
      state = new_state
    chex.assert_tree_all_finite(state)


@pytest.mark.slow
def test_inject_hyperparams_with_moment_bits():
  params = {"w": jnp.linspace(-1, 1, 64 * 80).reshape(64, 80), "b": jnp.ones(80)}
  grads = jax.tree.map(jnp.cos, params)
  hparams = dict(learning_rate=1e-2, b1=0.8, weight_decay=1e-2)
  injected = optax.inject_hyperparams(s4.adamw_shampoo4, static_args=STATIC + ("moment_bits",))(
      **hparams, moment_bits=8, **SHAMPOO)
  plain = s4.adamw_shampoo4(**hparams, moment_bits=8, **SHAMPOO)
  state, plain_state = injected.init(params), plain.init(params)
  assert set(state.hyperparams) == {"learning_rate", "b1", "b2", "eps", "weight_decay", "beta", "epsilon", "quant_damping",
                                    "refresh_tol"}
  update, plain_update = jax.jit(injected.update), jax.jit(plain.update)
  for _ in range(2):
    updates, state = update(grads, state, params)
    plain_updates, plain_state = plain_update(grads, plain_state, params)
    chex.assert_trees_all_close(updates, plain_updates, rtol=1e-4, atol=1e-6)
  assert state.inner_state[1].mu["w"].dtype == jnp.uint8
  # Without static_args, an integer moment_bits would be turned into a traced array: a clear error.
  with pytest.raises(ValueError, match="moment_bits.*static_args"):
    optax.inject_hyperparams(s4.adamw_shampoo4, static_args=STATIC)(moment_bits=8).init(params)


@pytest.mark.slow
def test_orbax_round_trip_is_bit_exact(tmp_path):
  params = {"w": jnp.zeros((64, 80)), "b": jnp.zeros(80), "e": jnp.zeros((50, 3, 40), jnp.bfloat16)}
  state = s4.adamw_shampoo4(moment_bits=4, **SHAMPOO).init(params)
  rng = np.random.default_rng(0)  # every leaf random: codes over all 256 byte values

  def fill(x):
    if x.dtype == jnp.uint8:
      return jnp.asarray(rng.integers(0, 256, x.shape), jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.asarray(rng.integers(0, 2**31 - 1, x.shape), x.dtype)
    return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

  state = jax.tree.map(fill, state)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, state)
  adam = restored[1]
  assert isinstance(adam, M.QuantizedAdamState) and adam.nu["e"].dtype == jnp.uint8
  assert adam.nu_scales["e"].shape == (50 + 3 + 40,)  # rank-1 maxima of the 3-D bf16 leaf
  assert adam.mu_scales["w"].shape == (64, 1) and adam.mu_scales["b"].shape == ()  # b stays float32


def test_state_nbytes_reports_moment_codes_and_scales():
  shapes = {"w": jax.ShapeDtypeStruct((512, 1000), jnp.float32), "b": jax.ShapeDtypeStruct((1000,), jnp.float32)}
  for bits in (8, 4):
    parts = s4.state_nbytes(jax.eval_shape(M.scale_by_adam(bits=bits).init, shapes))
    n = 512 * 1000
    assert parts["moment_codes"] == 2 * n * bits // 8
    if bits == 8:  # block-wise: ceil(1000 / 256) = 4 scales per row, for mu and nu
      assert parts["moment_scales"] == 2 * 512 * 4 * 4
    else:  # mu: ceil(1000 / 128) = 8 scales per row; nu: rank-1, one max per row and per column
      assert parts["moment_scales"] == 4 * (512 * 8 + 512 + 1000)
    assert parts["first_order"] == 2 * 4 * 1000  # the bias stays float32
    assert parts["total"] == sum(v for k, v in parts.items() if k not in ("total", "preconditioner"))


@pytest.mark.slow
def test_flax_nnx_optimizer_keeps_the_state_across_steps():
  from flax import nnx

  model = nnx.Linear(64, 128, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 64))
  for tx in (M.scale_by_adam(bits=4), M.trace(0.9, bits=8)):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(2):  # the second update reads the state the first one wrote back
      grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)
    assert any(leaf.dtype == jnp.uint8 for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))
