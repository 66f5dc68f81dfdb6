"""Checkpointing with orbax: bit-exact round trips and resumed training.

Restore with an abstract target (``jax.eval_shape(opt.init, params)`` or
``jax.tree.map(ocp.utils.to_shape_dtype_struct, state)``): the target carries
the NamedTuples, the bucket dict and the static fields of
:class:`~optax_shampoo4.QuantizedArray` (length, mapping, bits, block), which
an untargeted restore would lose.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optax_shampoo4 as s4

# T1 = 2, T2 = 3; orders 10 and 12 quantized (min_quant_order=8), order 3 in float32.
SHAMPOO = dict(stats_every=2, root_every=3, min_quant_order=8, quant_block=4)


def _signature(tree):
  return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def _random_fill(tree, seed=0):
  """Every leaf replaced by random values of its dtype (codes over all 256 byte values)."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if x.dtype == jnp.uint8:
      return jnp.asarray(rng.integers(0, 256, x.shape), jnp.uint8)
    if jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.asarray(rng.integers(0, 2**31 - 1, x.shape), x.dtype)
    return jnp.asarray(rng.standard_normal(x.shape), x.dtype)

  return jax.tree.map(fill, tree)


def _save(path, tree):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)


def _restore(path, abstract_tree):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract_tree)


@pytest.mark.parametrize("state_format", ["eigen", "naive", "fp32"])
def test_full_state_round_trips_bit_exactly(tmp_path, state_format):
  params = {"w": jnp.zeros((12, 10)), "b": jnp.zeros((10,)), "small": jnp.zeros((3, 12), jnp.bfloat16)}
  opt = s4.adamw_shampoo4(1e-3, state_format=state_format, **SHAMPOO)
  state = _random_fill(opt.init(params))
  shampoo_state = state[0]
  quantized = "_f32" if state_format == "fp32" else "_q"
  assert set(shampoo_state.factors) == {"order3_f32", "order10" + quantized, "order12" + quantized}
  if state_format != "fp32":
    codes = [x for x in jax.tree.leaves(shampoo_state.factors) if x.dtype == jnp.uint8]
    assert len(codes) == 4  # quantized eigenvectors / statistics and roots of two buckets

  _save(tmp_path / "state", state)
  restored = _restore(tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert _signature(restored) == _signature(state)
  chex.assert_trees_all_equal(restored, state)
  assert isinstance(restored[0], s4.ScaleByShampoo4State)
  stored = restored[0].factors["order12" + quantized]
  if state_format == "eigen":
    assert isinstance(stored.eigvecs, s4.QuantizedArray) and stored.eigvecs.block == 4
  elif state_format == "naive":
    assert isinstance(stored.stats, s4.OffDiagQuantized)


def _loss(params, x, y):
  return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def _data():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((32, 12)), jnp.float32),
          jnp.asarray(rng.standard_normal((32, 10)), jnp.float32))


def _make_step(opt):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.slow
def test_resumed_training_follows_the_uninterrupted_trajectory(tmp_path):
  steps, saved_at = 8, 3  # the save falls between a root step (3) and a statistics step (4)
  x, y = _data()
  params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((12, 10)) * 0.3, jnp.float32),
            "b": jnp.zeros((10,))}
  opt = s4.adamw_shampoo4(1e-2, **SHAMPOO)
  step = _make_step(opt)
  state = opt.init(params)
  trajectory = []
  for i in range(1, steps + 1):
    params, state = step(params, state, x, y)
    trajectory.append((params, state))
    if i == saved_at:
      _save(tmp_path / "ckpt", {"params": params, "opt_state": state})

  # A fresh process: a new optimizer object, its own compiled step, an abstract target from shapes only.
  fresh = s4.adamw_shampoo4(1e-2, **SHAMPOO)
  abstract_params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  target = {"params": abstract_params, "opt_state": jax.eval_shape(fresh.init, abstract_params)}
  restored = _restore(tmp_path / "ckpt", target)
  chex.assert_trees_all_equal((restored["params"], restored["opt_state"]), trajectory[saved_at - 1])
  params, state = restored["params"], restored["opt_state"]
  fresh_step = _make_step(fresh)
  for i in range(saved_at + 1, steps + 1):
    params, state = fresh_step(params, state, x, y)
    chex.assert_trees_all_equal((params, state), trajectory[i - 1])
  assert int(state[0].count) == steps and int(state[0].failed_refreshes) == 0
  assert float(_loss(params, x, y)) < float(_loss(trajectory[0][0], x, y))


class _Model(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(12, 10, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


def _build(seed):
  model = _Model(nnx.Rngs(seed))
  return model, nnx.Optimizer(model, s4.adamw_shampoo4(1e-2, **SHAMPOO), wrt=nnx.Param)


@nnx.jit
def _train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
  optimizer.update(model, grads)
  return loss


@pytest.mark.slow
def test_flax_nnx_optimizer_resumes_identically(tmp_path):
  x, y = _data()
  model, optimizer = _build(seed=0)
  for _ in range(3):
    _train_step(model, optimizer, x, y)
  _save(tmp_path / "nnx", {"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
  want = [float(_train_step(model, optimizer, x, y)) for _ in range(4)]

  new_model, new_optimizer = _build(seed=1)  # other initial weights: the restore must overwrite them
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"model": nnx.state(new_model), "optimizer": nnx.state(new_optimizer)})
  restored = _restore(tmp_path / "nnx", abstract)
  nnx.update(new_model, restored["model"])
  nnx.update(new_optimizer, restored["optimizer"])
  assert int(new_optimizer.step.value) == 3
  got = [float(_train_step(new_model, new_optimizer, x, y)) for _ in range(4)]
  assert got == want
  chex.assert_trees_all_equal(nnx.state(new_model), nnx.state(model))
  chex.assert_trees_all_equal(nnx.state(new_optimizer), nnx.state(optimizer))
  shampoo_state = new_optimizer.opt_state[0]
  assert isinstance(shampoo_state, s4.ScaleByShampoo4State)
  assert isinstance(shampoo_state.factors["order12_q"].eigvecs, s4.QuantizedArray)
  assert int(shampoo_state.count.value) == 7 and int(shampoo_state.failed_refreshes.value) == 0
