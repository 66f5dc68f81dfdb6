"""Tests for optax_shampoo4.moments: 8- and 4-bit Adam / momentum / Adagrad moments.

Round trips are compared with a numpy computation of the same scheme (block
absmax or rank-1 normalization, nearest code); training runs compare with
float32 optax on an MLP on the digits data set.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import sweep
from jax import lax

import optax_shampoo4 as s4

M = s4.moments
MS = s4.moment_storage
KEY = jax.random.PRNGKey(0)
SHAMPOO = dict(stats_every=2, root_every=3, min_quant_order=8, quant_block=4)
STATIC = ("max_order", "stats_every", "root_every", "bits", "quant_block", "min_quant_order")


def _numpy_table(mapping, bits):
  """Codebooks written independently of the library (bitsandbytes' construction, Li et al.'s linear)."""
  if mapping == "linear_unsigned_nonzero":
    return (np.arange(2**bits) + 1.0) / 2**bits
  signed = mapping == "dynamic_tree"
  values = [0.0, 1.0]
  for i in range(bits - 1):
    items = 2**i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1.0, items + 1)
    magnitudes = 10.0 ** (-(bits - 2) + i) * (edges[:-1] + edges[1:]) / 2
    values += list(magnitudes) + (list(-magnitudes) if signed else [])
  return np.sort(np.asarray(values))


def _nearest(normalized, table):
  return table[np.argmin(np.abs(normalized[..., None] - table), axis=-1)]


def _numpy_block(x, mapping, bits, block, positive_floor=False):
  """Block-absmax quantize + dequantize along the last axis, nearest code, in float64."""
  table = _numpy_table(mapping, bits)
  n = x.shape[-1]
  pad = -n % block
  blocks = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(x.shape[:-1] + (-1, block))
  scale = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)  # signed largest magnitude
  normalized = blocks / np.where(scale != 0, scale, 1)
  if positive_floor:
    normalized = np.where(blocks > 0, np.maximum(normalized, table[table > 0].min()), normalized)
  out = (_nearest(normalized, table) * scale).reshape(x.shape[:-1] + (-1,))[..., :n]
  return out, np.abs(np.broadcast_to(scale, blocks.shape)).reshape(x.shape[:-1] + (-1,))[..., :n]


def _numpy_rank1(v):
  """Li et al.'s rank-1 normalization + zero-free linear 4-bit code, nearest, in float64."""
  v = v.astype(np.float64)
  normalizer = np.minimum(v.max(1, keepdims=True), v.max(0, keepdims=True))
  normalized = v / np.where(normalizer > 0, normalizer, 1)
  return _nearest(normalized, _numpy_table("linear_unsigned_nonzero", 4)) * normalizer, normalizer


def _heavy_tailed(shape, seed, positive=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))
  return (x * x if positive else x).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Codebooks and round trips


@pytest.mark.parametrize("mapping", ["dynamic_tree", "dynamic_tree_unsigned", "linear_unsigned_nonzero"])
@pytest.mark.parametrize("bits", [4, 8])
def test_codebooks_match_independent_construction(mapping, bits):
  np.testing.assert_allclose(s4.quantization.codebook(mapping, bits), _numpy_table(mapping, bits), rtol=1e-6)


def test_unsigned_codebooks_spend_no_code_on_a_sign():
  for bits in (4, 8):
    unsigned = np.asarray(s4.quantization.codebook("dynamic_tree_unsigned", bits))
    signed = np.asarray(s4.quantization.codebook("dynamic_tree", bits))
    assert unsigned.min() == 0.0 and (signed > 0).sum() < (unsigned > 0).sum() == 2**bits - 1
    assert np.asarray(s4.quantization.codebook("linear_unsigned_nonzero", bits)).min() == 2.0**-bits


# (bits, kind) -> stated bound on |x_hat - x| / block absmax for nearest rounding (half the widest code gap).
BLOCK_BOUNDS = {(8, "first"): 0.00704, (8, "second"): 0.00352, (4, "first"): 0.1125}


@pytest.mark.parametrize("bits,kind", list(BLOCK_BOUNDS))
@sweep(0)
def test_block_round_trip_matches_numpy_within_stated_bound(bits, kind, seed):
  x = _heavy_tailed((48, 700), seed=bits + seed, positive=kind == "second")  # 700: a partial last block
  stored = MS.store_moment(x, bits, kind)
  scheme = MS.SCHEMES[bits, kind]
  assert isinstance(stored, MS.QuantizedMoment) and stored.block == scheme.block
  assert stored.codes.dtype == jnp.uint8 and stored.codes.shape == (48, 700 * bits // 8)
  got = np.asarray(MS.load_moment(stored))
  want, scale = _numpy_block(x, scheme.mapping, bits, scheme.block, positive_floor=kind == "second")
  # Ties: an x within float32 rounding of the midpoint of two codes may round to either (the library
  # normalizes in float32, the reference in float64); both codes are then equally near. Elsewhere: the same code.
  tie = np.abs(np.abs(got - x) - np.abs(want - x)) <= 4 * np.finfo(np.float32).eps * scale
  np.testing.assert_allclose(got[~tie], want[~tie], rtol=1e-6, atol=1e-30)  # float32 code * scale: <= eps
  assert np.mean(~np.isclose(got, want, rtol=1e-6, atol=1e-30)) < 1e-3  # ties are rare (1 in 33600, 20 seeds)
  error = np.abs(got - x) / scale
  assert error.max() <= BLOCK_BOUNDS[bits, kind] * (1 + 1e-5), error.max()


@pytest.mark.slow
def test_rank1_second_moment_round_trip_matches_numpy_within_stated_bound():
  v = _heavy_tailed((96, 301), seed=3, positive=True)
  stored = MS.store_moment(v, 4, "second")
  assert stored.block == MS.RANK1 and stored.codes.shape == (96, 151)
  assert stored.scales.shape == (96 + 301,)  # row maxima, then column maxima
  got = np.asarray(MS.load_moment(stored))
  want, normalizer = _numpy_rank1(v)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Values at least one code step up are within half a step (1/32 of min(r_i, c_j)); smaller ones are
  # raised to the first code (1/16), never lowered to 0.
  large = v >= normalizer / 16
  assert np.all(np.abs(got - v)[large] <= normalizer[np.broadcast_to(True, v.shape) & large] / 32 * (1 + 1e-6))
  assert np.all(got[~large] == pytest.approx(np.broadcast_to(normalizer, v.shape)[~large] / 16, rel=1e-6))


@pytest.mark.parametrize("bits", [pytest.param(4, marks=pytest.mark.slow), 8])
def test_second_moment_never_negative_and_positive_never_zero(bits):
  rng = np.random.default_rng(bits)
  v = _heavy_tailed((64, 256), seed=7, positive=True) * (rng.random((64, 256)) < 0.7)  # 30% exact zeros
  v[0, :5] = [1e-30, 1e-20, 1e-10, 1.0, 1e30]  # ~60 decades in one row (and block)
  for tensor in (v, v.reshape(-1)):  # rank-1 (4 bits) and block-wise
    for key in (None, KEY):
      got = np.asarray(MS.load_moment(MS.store_moment(tensor, bits, "second", key=key)))
      assert got.min() >= 0 and np.all(got[tensor > 0] > 0)
      if bits == 8:  # 4 bits: Li et al.'s zero-free codebook stores an exact 0 as 1/16 of its normalizer
        np.testing.assert_array_equal(got > 0, tensor > 0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["first", "second"])
def test_zeros_huge_and_tiny_values(bits, kind):
  zeros = jnp.zeros((64, 128))
  np.testing.assert_array_equal(MS.load_moment(MS.store_moment(zeros, bits, kind)), 0.0)
  rng = np.random.default_rng(0)
  x = rng.random((64, 128)).astype(np.float32) + 0.5
  if kind == "first":
    x *= np.sign(rng.standard_normal(x.shape))
  x[:32] *= 1e30
  x[32:] *= 1e-30
  got = np.asarray(MS.load_moment(MS.store_moment(x, bits, kind)))
  assert np.all(np.isfinite(got))
  relative = np.abs(got - x) / np.abs(x)  # values within [0.5, 1.5] x their row scale: tight everywhere
  assert relative.max() < (0.5 if bits == 4 else 0.03), relative.max()


def test_small_tensors_stay_float32():
  for shape in [(), (7,), (63, 65)]:  # 63 * 65 = 4095 < MIN_QUANTIZED_SIZE
    x = jnp.ones(shape, jnp.bfloat16)
    stored = MS.store_moment(x, 8, "first")
    assert not isinstance(stored, MS.QuantizedMoment) and stored.dtype == jnp.float32
  assert isinstance(MS.store_moment(jnp.ones((64, 64)), 8, "first"), MS.QuantizedMoment)


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbouring_code(bits):
  x = jnp.asarray(_heavy_tailed((32, 128), seed=11))
  keys = jax.random.split(KEY, 256)
  draws = jax.jit(jax.vmap(lambda k: MS.load_moment(MS.store_moment(x, bits, "first", key=k))))(keys)
  scheme = MS.SCHEMES[bits, "first"]
  _, scale = _numpy_block(np.asarray(x), scheme.mapping, bits, scheme.block)
  table = _numpy_table(scheme.mapping, bits)
  widest_gap = np.diff(table).max()
  assert np.all(np.abs(np.asarray(draws) - np.asarray(x)) <= widest_gap * scale * (1 + 1e-6))
  mean = np.asarray(draws.mean(0))
  stderr = widest_gap * scale / 2 / np.sqrt(len(keys))
  assert np.mean(np.abs(mean - np.asarray(x)) <= 4 * stderr) > 0.999


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
  assert set(state.hyperparams) == {"learning_rate", "b1", "b2", "eps", "weight_decay", "beta", "epsilon",
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
