"""The every-step preconditioning split over devices, and resuming on another mesh.

With ``mesh=``, :meth:`FactorEngine.apply_blocks` gives each device a share of
the ``L̂ G R̂`` products (:func:`partition.make_schedule`) and all-gathers the
results. Checked here on 8 virtual CPU devices (``tests/conftest.py``):

* the schedule covers every row of every block exactly once, and balances the
  work within 1.2x of an even split;
* the sharded update equals the single-device one on a tree with several
  blocks per shape. The state has random roots and no refresh is due, so both
  programs dequantize the same codes: only float32 rounding differs
  (tolerance ``1e-5 * max|update|``). Every format, FSDP-style gradients and a
  2-D mesh go through the same split path in ``tests/test_sharding.py``;
* the per-device matrix-product flops of the compiled update (its HLO, outside
  the gated refresh branches) are the schedule's, and at most 0.3x the
  single-device program's on 8 devices;
* a run that moves 8 -> 4 -> 1 -> 8 devices through orbax checkpoints and
  :func:`s4.convert_state` follows the single-device run.

As in ``tests/test_sharding.py``, every result is blocked on before the next
program starts (XLA's in-process CPU collectives can deadlock otherwise).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_shampoo4 as s4
from benchmarks.hlo_flops import dot_flops
from benchmarks.model_shapes import MODELS
from optax_shampoo4 import engine, partition
from optax_shampoo4 import factors as fct
from optax_shampoo4 import quantization as qz

NUM_DEVICES = 8
CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(CPUS) < NUM_DEVICES,
    reason=f"needs {NUM_DEVICES} CPU devices (tests/conftest.py sets jax_num_cpu_devices)")

# Blocks (max_order 16): "a" (48, 40) -> 6 of (16, 16) and 3 of (16, 8); "b" one (16, 16); "c" (8, 24) ->
# (8, 16) and (8, 8); "bias" passes through. Order-16 factors are 4-bit, order 8 float32.
SHAPES = {"a": (48, 40), "b": (16, 16), "c": (8, 24), "bias": (16,)}
CONFIG = dict(max_order=16, min_quant_order=16, quant_block=8)
NO_REFRESH = dict(stats_every=1000, root_every=1000)


MESH_KINDS = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}


def _mesh(n=NUM_DEVICES, kind="auto"):
  """``n`` devices on one "data" axis; ``kind``: a key of MESH_KINDS (explicit: ``jax.make_mesh``'s default)."""
  return jax.make_mesh((n,), ("data",), axis_types=(MESH_KINDS[kind],), devices=CPUS[:n])


def _params():
  return {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}


def _grads(seed, steps=1):
  rng = np.random.default_rng(seed)
  return [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(steps)]


def _max_rel_diff(a, b):
  a, b = jax.tree.leaves(jax.tree.map(np.asarray, a)), jax.tree.leaves(jax.tree.map(np.asarray, b))
  scale = max(float(np.max(np.abs(y))) for y in b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) / scale


# ----------------------------------------------------------------------------- the schedule


def _plan(shapes, max_order=1024, num_shards=1):
  return partition.make_plan(shapes, max_order, 64, True, bucket_multiple=num_shards)


@pytest.mark.parametrize("shapes, max_order", [
    (list(SHAPES.values()), 16),
    ([(1000, 24)], 1024),  # one block: split by rows over the devices
    ([(81, 7), (81, 7), (5, 300), (64, 64)], 32),  # row counts not divisible by the device count
])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_schedule_covers_every_block_row_exactly_once(shapes, max_order, num_shards):
  plan = _plan(shapes, max_order, num_shards)
  schedule = partition.make_schedule(plan, num_shards)
  seen = {}
  for group in schedule.groups:
    m, n = group.shape
    per_device = group.items(num_shards)
    assert len(per_device) == num_shards and all(len(items) == group.per_shard for items in per_device)
    for items in per_device:
      for position, left, right, first_row in items:
        if position == len(group.blocks):  # padding item
          continue
        leaf, block = group.blocks[position]
        assert (block.rows[1] - block.rows[0], block.cols[1] - block.cols[0]) == (m, n)
        assert (left, right) == (block.left.index, block.right.index)
        for row in range(first_row, min(first_row + group.rows, m)):
          seen[leaf, block.rows, block.cols, row] = seen.get((leaf, block.rows, block.cols, row), 0) + 1
  want = {(i, b.rows, b.cols, r) for i, lp in enumerate(plan.leaves) for b in lp.blocks
          for r in range(b.rows[1] - b.rows[0])}
  assert set(seen) == want and set(seen.values()) == {1}
  # The cost model: padding counts, so the per-device cost is at least an even share.
  assert schedule.shard_cost * num_shards >= schedule.total_cost
  assert schedule.total_cost == sum(partition.block_cost(b.rows[1] - b.rows[0], b.cols[1] - b.cols[0])
                                    for lp in plan.leaves for b in lp.blocks)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_schedule_balances_model_trees(model, num_shards):
  shapes = [leaf.shape for leaf in jax.tree.leaves(MODELS[model]())]
  schedule = partition.make_schedule(_plan(shapes, 1024, num_shards), num_shards)
  assert schedule.balance <= 1.2, (model, num_shards, schedule.balance)


def test_schedule_splits_a_single_block_evenly():
  schedule = partition.make_schedule(_plan([(1024, 256)]), 8)
  (group,) = schedule.groups
  assert (group.chunks, group.rows, group.per_shard) == (8, 128, 1)
  assert schedule.balance == 1.0


# ----------------------------------------------------------------------------- apply_blocks


def _random_stored(plan, seed=0):
  """``{bucket name: stacked matrices}``: 4-bit off-diagonal, 4-bit rows or dense, random."""
  rng = np.random.default_rng(seed)
  stored = {}
  for key, size in plan.bucket_sizes:
    x = rng.standard_normal((size, key.order, key.order)).astype(np.float32)
    if not key.quantized:
      stored[key.name] = jnp.asarray(x)
    elif key.order % 2:
      stored[key.name] = qz.quantize(x, "linear2", 4, 8)
    else:
      stored[key.name] = qz.quantize_offdiag(x, "linear2", 4, 8)
  return stored


def _float64_reference(plan, matrices, stored):
  """``A G B`` per block in float64 from the dequantized factors, reassembled per leaf."""
  factors = {name: np.asarray(fct.load(s), np.float64) for name, s in stored.items()}
  out = []
  for matrix, lp in zip(matrices, plan.leaves):
    if not lp.preconditioned:
      out.append(None)
      continue
    full = np.zeros(lp.matrix_shape)
    for b in lp.blocks:
      g = np.asarray(matrix, np.float64)[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
      full[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = (
          factors[b.left.bucket.name][b.left.index] @ g @ factors[b.right.bucket.name][b.right.index])
    out.append(full)
  return out


def _left_right(a, g, b):
  return a @ g @ b


@pytest.mark.slow
def test_apply_blocks_on_a_mesh_matches_float64():
  # Orders 32 and 30: 4-bit off-diagonal; 17 and 21: 4-bit rows (odd); 5 and 7: float32. Ragged row chunks.
  shapes, max_order = [(81, 7), (81, 7), (5, 30), (21, 21), (3,)], 32
  mesh = _mesh()
  config = fct.FactorConfig(quant_block=8)
  sharded = engine.FactorEngine(config, max_order, 16, mesh)
  single = engine.FactorEngine(config, max_order, 16)
  plan = sharded.plan([jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
  stored = _random_stored(plan)
  rng = np.random.default_rng(1)
  matrices = [None if lp.matrix_shape is None else rng.standard_normal(lp.matrix_shape).astype(np.float32)
              for lp in plan.leaves]
  want = _float64_reference(plan, matrices, stored)
  got = jax.block_until_ready(jax.jit(lambda s, m: sharded.apply_blocks(plan, m, s, _left_right))(
      sharded.gathered(stored), matrices))
  with jax.default_device(CPUS[0]):
    one = jax.block_until_ready(jax.jit(lambda s, m: single.apply_blocks(plan, m, s, _left_right))(
        jax.device_put(stored, CPUS[0]), matrices))
  for g, o, w in zip(got, one, want):
    if w is None:
      assert g is None and o is None
      continue
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * np.max(np.abs(w)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(o), rtol=0, atol=1e-5 * np.max(np.abs(w)))


# ----------------------------------------------------------------------------- the update


def _random_roots(state, counts, seed):
  """``state`` with random roots in the real factors (still valid storage: codes, positive scales)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    keys = jax.tree_util.keystr(path)
    if ".root" not in keys:
      return leaf
    name = keys.split("['")[1].split("']")[0]
    host = np.array(leaf)
    real = host[:counts[name]]
    if host.dtype == np.uint8:
      real[...] = rng.integers(0, 256, real.shape)
    elif "scales" in keys:
      real[...] = rng.uniform(0.1, 1.0, real.shape)
    else:
      real[...] = rng.standard_normal(real.shape)
    return jax.device_put(host, leaf.sharding)

  return jax.tree_util.tree_map_with_path(fill, state)


def _unpadded(state, counts, device):
  def one(path, node):
    if isinstance(node, (fct.EigenFactors, fct.MatrixFactors)):
      name = path[-1].key
      return jax.tree.map(lambda x: jax.device_put(np.asarray(x)[:counts[name]], device), node)
    return jax.device_put(np.asarray(node), device)

  return jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda n: isinstance(n, (fct.EigenFactors, fct.MatrixFactors)))


@functools.cache
def _compiled_eigen(kind="auto"):
  """The eigen-format update on 8 devices and on one, each compiled once, and a state with random roots."""
  mesh = _mesh(kind=kind)
  params = _params()
  tx8 = s4.scale_by_shampoo4(mesh=mesh, **CONFIG, **NO_REFRESH)
  tx1 = s4.scale_by_shampoo4(**CONFIG, **NO_REFRESH)
  counts = {name: jax.tree.leaves(b)[0].shape[0] for name, b in jax.eval_shape(tx1.init, params).factors.items()}
  shardings = s4.state_sharding(jax.eval_shape(tx8.init, params), mesh)
  state8 = jax.block_until_ready(jax.jit(tx8.init, out_shardings=shardings)(params))
  state8 = jax.block_until_ready(_random_roots(state8, counts, seed=3))
  replicated = NamedSharding(mesh, P())
  grads8 = jax.device_put(_grads(seed=4)[0], replicated)
  update8 = jax.jit(tx8.update, out_shardings=(replicated, shardings)).lower(grads8, state8).compile()
  state1 = _unpadded(state8, counts, CPUS[0])
  grads1 = jax.device_put(_grads(seed=4)[0], CPUS[0])
  update1 = jax.jit(tx1.update).lower(grads1, state1).compile()
  return dict(update8=update8, update1=update1, state8=state8, state1=state1, grads8=grads8, grads1=grads1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", MESH_KINDS)
def test_split_update_equals_single_device(kind):
  """Random roots in every real factor, no refresh due: the split products equal one device's."""
  run = _compiled_eigen(kind)
  out8, new8 = jax.block_until_ready(run["update8"](run["grads8"], run["state8"]))
  out1, _ = jax.block_until_ready(run["update1"](run["grads1"], run["state1"]))
  assert _max_rel_diff(out8, out1) <= 1e-5
  assert _max_rel_diff(out8, run["grads1"]) > 0.1  # the random roots really precondition
  assert int(new8.failed_refreshes) == 0


@pytest.mark.slow
def test_per_device_matmul_flops_split_over_the_mesh():
  """Per-device every-step dot flops of the compiled update: the schedule's, <= 0.3x one device's."""
  run = _compiled_eigen()
  flops8, flops1 = dot_flops(run["update8"].as_text()), dot_flops(run["update1"].as_text())
  plan = partition.make_plan(list(SHAPES.values()), 16, 16, True, bucket_multiple=NUM_DEVICES)
  schedule = partition.make_schedule(plan, NUM_DEVICES)
  assert flops1["every_call"] == 2 * schedule.total_cost
  assert flops8["every_call"] == 2 * schedule.shard_cost
  assert flops8["every_call"] <= 0.3 * flops1["every_call"]
  assert schedule.balance <= 1.2


# ----------------------------------------------------------------------------- resume on other meshes


RESUME = dict(state_format="naive", stats_every=2, root_every=3, **CONFIG)
PHASES = ((8, 3), (4, 3), (1, 3), (8, 3))  # (devices, steps): 8 -> 4 -> 1 -> 8
# Blocks: (16, 16) x 3 and (16, 8) x 3; 9 factors of order 16 (4-bit: 16, 12, 9 slots on 8, 4, 1 devices).
RESUME_SHAPES = {"a": (48, 24), "bias": (24,)}


def _adamw(mesh):
  return s4.adamw_shampoo4(1e-2, weight_decay=1e-2, mesh=mesh, **RESUME)


@functools.cache
def _resume_programs(devices, kind="auto"):
  """``(tx, state shardings, param shardings, jitted update)`` for a mesh of ``devices``, built once."""
  abstract_params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in RESUME_SHAPES.items()}
  if devices == 1:
    tx = _adamw(None)
    single = jax.sharding.SingleDeviceSharding(CPUS[0])
    return tx, single, single, jax.jit(tx.update)
  mesh = _mesh(devices, kind)
  tx = _adamw(mesh)
  state_shardings = s4.state_sharding(jax.eval_shape(tx.init, abstract_params), mesh)
  param_shardings = NamedSharding(mesh, P())
  return tx, state_shardings, param_shardings, jax.jit(tx.update, out_shardings=(param_shardings, state_shardings))


def _save(path, tree):
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)


def _restore(path, abstract_tree):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract_tree)


@pytest.mark.slow
@pytest.mark.parametrize("kind", MESH_KINDS)
def test_resume_on_8_4_1_8_devices_follows_the_single_device_run(tmp_path, kind):
  steps = sum(n for _, n in PHASES)
  rng = np.random.default_rng(5)
  grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in RESUME_SHAPES.items()} for _ in range(steps)]
  params0 = {k: np.full(s, 0.1, np.float32) for k, s in RESUME_SHAPES.items()}
  abstract_params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params0)

  # The reference: one device, no checkpoints.
  tx1, _, _, update1 = _resume_programs(1)
  with jax.default_device(CPUS[0]):
    params, state = jax.device_put(params0, CPUS[0]), tx1.init(params0)
    reference = []
    for g in grads:
      out, state = jax.block_until_ready(update1(g, state, params))
      params = optax.apply_updates(params, out)
      reference.append(jax.tree.map(np.asarray, (out, params)))

  params, state, saved_tx, step, sizes = params0, None, None, 0, []
  for phase, (devices, num_steps) in enumerate(PHASES):
    tx, state_shardings, param_shardings, update = _resume_programs(devices, kind)
    if state is None:
      state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    else:
      # The saved layout, as a host without those devices would build it.
      target = jax.eval_shape(saved_tx.init, abstract_params)
      restored = _restore(tmp_path / f"phase{phase - 1}", {"params": abstract_params, "opt_state": target})
      params = restored["params"]
      state = s4.convert_state(restored["opt_state"], tx, abstract_params, state_shardings)
    state = jax.block_until_ready(state)
    sizes.append(jax.tree.leaves(state[0].factors["order16_q"])[0].shape[0])
    params = jax.device_put(params, param_shardings)
    for _ in range(num_steps):
      out, state = jax.block_until_ready(update(grads[step], state, params))
      params = jax.block_until_ready(optax.apply_updates(params, out))
      want_out, want_params = reference[step]
      step += 1
      assert _max_rel_diff(out, want_out) <= 1e-4, f"{devices} devices, step {step}"
      assert _max_rel_diff(params, want_params) <= 1e-5, f"{devices} devices, step {step}"
    _save(tmp_path / f"phase{phase}", {"params": params, "opt_state": state})
    saved_tx = _adamw(jax.sharding.AbstractMesh((devices,), ("data",)) if devices > 1 else None)
    params = jax.tree.map(np.asarray, params)
  assert step == steps and int(state[0].count) == steps and int(state[0].failed_refreshes) == 0
  # The layouts really differed: the order-16 bucket padded to a multiple of each device count.
  real = jax.tree.leaves(jax.eval_shape(tx1.init, abstract_params)[0].factors["order16_q"])[0].shape[0]
  assert sizes == [-(-real // n) * n for n, _ in PHASES] and len(set(sizes)) == 3
  assert _max_rel_diff(reference[-1][0], grads[-1]) > 0.1  # the preconditioner was really used
