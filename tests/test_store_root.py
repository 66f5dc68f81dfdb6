"""``store_root=False``: no inverse root in the state, formed from the eigenpairs at every step.

The reference is float64 numpy: from the state's dequantized eigenvectors,
Björck-rectified in numpy, :math:`\\hat L = V (\\Lambda + \\epsilon \\lambda_{\\max})^{-1/4} V^\\top`,
then :math:`\\hat L G \\hat R` grafted to :math:`\\|G\\|_F`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import factors as fct

EPSILON = 1e-4
CONFIG = dict(stats_every=1, root_every=1, epsilon=EPSILON, min_quant_order=16, quant_block=16)


def _params():
  return {"w": jnp.zeros((48, 32)), "b": jnp.zeros((32,))}


def _grads(step):
  key = jax.random.PRNGKey(step)
  w = jax.random.normal(key, (48, 32)) * jnp.linspace(0.2, 2.0, 32)  # anisotropic columns
  return {"w": w, "b": jax.random.normal(jax.random.fold_in(key, 1), (32,))}


def _np_bjorck(v, steps):
  for _ in range(steps):
    v = 1.5 * v - 0.5 * v @ v.T @ v
  return v


def _np_root(bucket, index, bjorck_steps):
  rows = np.asarray(fct.load(bucket.eigvecs)[index], np.float64)
  if fct.is_quantized(bucket.eigvecs):
    rows = _np_bjorck(rows, bjorck_steps)
  eigvals = np.asarray(bucket.eigvals[index], np.float64)
  damped = eigvals + EPSILON * eigvals.max()
  return rows.T @ np.diag(damped ** -0.25) @ rows


def _run(steps, **kwargs):
  tx = s4.scale_by_shampoo4(**(CONFIG | kwargs))
  state = tx.init(_params())
  update = jax.jit(tx.update)
  for step in range(steps):
    grads = _grads(step)
    updates, state = update(grads, state)
  return grads, updates, state


@pytest.mark.parametrize("bits", [4, 8])
def test_update_equals_float64_reference_from_the_stored_eigenpairs(bits):
  grads, updates, state = _run(4, store_root=False, bits=bits)
  buckets = state.factors
  left = next(b for name, b in buckets.items() if name.startswith("order48"))
  right = next(b for name, b in buckets.items() if name.startswith("order32"))
  assert left.root is None and right.root is None
  g = np.asarray(grads["w"], np.float64)
  preconditioned = _np_root(left, 0, 4) @ g @ _np_root(right, 0, 4)
  expected = preconditioned * np.linalg.norm(g) / np.linalg.norm(preconditioned)
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
  # The preconditioner acted: the update is not the (rescaled) gradient.
  assert np.abs(expected - g).max() > 0.05 * np.abs(g).max()


def test_matches_stored_root_when_roots_are_refreshed_every_step_in_float32():
  """Unquantized factors (order below min_quant_order): both settings compute the same roots."""
  kwargs = dict(min_quant_order=64)
  _, kept, _ = _run(3, **kwargs)
  _, formed, _ = _run(3, store_root=False, **kwargs)
  np.testing.assert_allclose(np.asarray(formed["w"]), np.asarray(kept["w"]), rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(kept["w"]).max()))


def test_preconditioner_memory_halves():
  shapes = {"w": jax.ShapeDtypeStruct((768, 3072), jnp.float32)}
  nbytes = {}
  for store_root in (True, False):
    tx = s4.scale_by_shampoo4(store_root=store_root)
    nbytes[store_root] = s4.state_nbytes(jax.eval_shape(tx.init, shapes))
  assert nbytes[False]["diagonals"] == 0
  ratio = nbytes[False]["preconditioner"] / nbytes[True]["preconditioner"]
  assert 0.45 < ratio < 0.55, ratio


def test_nonfinite_gradient_leaves_state_untouched():
  _, _, state = _run(2, store_root=False)
  tx = s4.scale_by_shampoo4(**CONFIG, store_root=False)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(5))
  updates, new_state = jax.jit(tx.update)(bad, state)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  for a, b in zip(jax.tree.leaves(state.factors), jax.tree.leaves(new_state.factors)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(new_state.nonfinite_steps) == 1


def test_alias_trains_with_store_root_false():
  """AdamW + 4-bit Shampoo without stored roots lowers a least-squares loss."""
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (256, 32))
  w_true = jax.random.normal(jax.random.fold_in(key, 1), (32, 24))
  y = x @ w_true

  def loss(params):
    return jnp.mean((x @ params["w"] - y) ** 2)

  params = {"w": jnp.zeros((32, 24))}
  opt = s4.adamw_shampoo4(3e-2, weight_decay=0.0, stats_every=5, store_root=False, min_quant_order=16)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = float(loss(params))
  for _ in range(150):
    params, state = step(params, state)
  assert math.isfinite(float(loss(params))) and float(loss(params)) < 0.05 * start


@pytest.mark.parametrize("kwargs, error", [
    (dict(state_format="naive"), ValueError),
    (dict(state_format="fp32"), ValueError),
    (dict(root_method="newton"), ValueError),
    (dict(store_root="no"), TypeError),
])
def test_bad_store_root_combinations_raise_naming_the_argument(kwargs, error):
  args = dict(store_root=False) | kwargs
  with pytest.raises(error, match="store_root"):
    s4.scale_by_shampoo4(**args)


@pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices (tests/conftest.py)")
def test_sharded_roots_formed_per_device_match_single_device():
  """With a mesh each device forms its share of the roots; the updates equal one device's.

  Float32 factors (order below ``min_quant_order``), so no 4-bit code can flip
  between the two runs' rounding.
  """
  cpus = jax.devices("cpu")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=cpus[:8])
  kwargs = dict(CONFIG, min_quant_order=64, store_root=False)
  results = []
  for m in (None, mesh):
    tx = s4.scale_by_shampoo4(mesh=m, **kwargs)
    with jax.default_device(cpus[0]):
      state = tx.init(_params())
      if m is not None:
        state = jax.device_put(state, s4.state_sharding(state, m))
      update = jax.jit(tx.update)
      outs = []
      for step in range(3):
        updates, state = update(_grads(step), state)
        outs.append(jax.device_get(updates["w"]))
    results.append(outs)
  for single, sharded in zip(*results):
    # Two compilations of the same float32 maths (measured 1e-4 of the largest update); a wrong shard is O(1).
    np.testing.assert_allclose(sharded, single, rtol=1e-3, atol=1e-3 * np.abs(single).max())
