"""FSDP: gradients split like the parameters reach the blocks' owners, never gathered whole.

On 8 virtual CPU devices (``tests/conftest.py`` sets ``jax_num_cpu_devices``),
parameters and gradients are split over a mesh axis (FSDP), in two layouts:

* ``fsdp``: a 1-D ``("fsdp",)`` mesh, every parameter split along its first
  axis, the factors split over the same axis;
* ``2d``: a ``("data", "model") = (4, 2)`` mesh, the factors split over
  ``"data"`` and every parameter split over ``"model"`` along its last axis
  (so the blocks must change both their split and their axis to reach their
  owners); ``2d-data`` (slow run): the same mesh, parameters split over
  ``"data"`` along their first axis.

Each on an auto and an explicit mesh (the default axis type of ``jax.make_mesh``).
The checks:

* the compiled ``tx.update`` (Shampoo and SOAP, refresh branches included)
  has no floating-point all-gather whose per-device result is as large as a
  whole gradient: as many elements as the smallest preconditioned parameter
  (every whole parameter, and every bucket's or group's full stack of
  gradient blocks, is at least that large). The gradient blocks reach their
  owners by all-to-all (or local slices) and the search directions return
  in the parameters' layout the same way. The tree is chosen so that no
  legitimate all-gather reaches that size: a device's share of the blocks
  (at most 5 blocks of 32 x 32 = 5120 elements) and the gathered 4-bit
  roots' float32 parts (``[32, 32]`` diagonals and block scales) are below
  the smallest parameter (6144 elements). :func:`benchmarks.hlo_flops.all_gathers`
  itself is checked on a program that does gather a whole parameter.
* the whole train state (parameters + 4-bit ``adamw_shampoo4`` state) of
  GPT-2 124M shapes per device, FSDP on 8 devices, is at most 1.2x an even
  split of its total (exact, from each leaf's shard shape:
  ``benchmarks/distributed.py``'s table);
* the FSDP update equals the single-device one along a trajectory through
  statistics and root refreshes (``"fp32"`` factors, whose trajectories are
  not chaotic in the rounding, see ``tests/test_sharding.py``): within
  ``UPDATE_RTOL * max|update|``, the tolerance of the other sharded tests
  (1e-3); measured at most 2.5e-7 for Shampoo (the Gram matrices and products
  are summed in another order on the owners) and exactly 0 for SOAP, so
  >= 1000x headroom.

Every result is blocked on before the next program starts (XLA's in-process
CPU collectives can deadlock otherwise).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_collectives import unordered_collectives
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_shampoo4 as s4
from benchmarks.distributed import fsdp_memory_table
from benchmarks.hlo_flops import all_gathers

NUM_DEVICES = 8
CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(CPUS) < NUM_DEVICES,
    reason=f"needs {NUM_DEVICES} CPU devices (tests/conftest.py sets jax_num_cpu_devices)")

# max_order 32: "a" -> 2 x 3 blocks, "b" -> 3 x 2, "c" -> 4 x 2: 20 blocks of 32 x 32, 40 order-32 factors
# (4-bit); the bias passes through.
SHAPES = {"a": (64, 96), "b": (96, 64), "c": (128, 64), "bias": (64,)}
SMALLEST_GRADIENT = min(math.prod(s) for s in SHAPES.values() if len(s) == 2)
SHAMPOO = dict(max_order=32, min_quant_order=16, stats_every=2, root_every=4)
SOAP = dict(max_order=32, min_quant_order=16, precondition_every=2)
UPDATE_RTOL = 1e-3
STEPS = 5  # statistics at 2 and 4, roots at 4, step 5 preconditioned by them
MESH_KINDS = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}
# layout: (mesh shape, axis names, the factors' axis, the axis the parameters are split over, which of their axes)
LAYOUTS = {"fsdp": ((8,), ("fsdp",), "fsdp", "fsdp", 0), "2d": ((4, 2), ("data", "model"), "data", "model", -1),
           "2d-data": ((4, 2), ("data", "model"), "data", "data", 0)}


def _setup(layout, kind):
  """(mesh, factor axis, parameter shardings, parameters placed with them)."""
  shape, names, factor_axis, param_axis, dim = LAYOUTS[layout]
  mesh = jax.make_mesh(shape, names, axis_types=(MESH_KINDS[kind],) * len(shape),
                       devices=CPUS[:math.prod(shape)])

  def spec(s):
    entries = [None] * len(s)
    entries[dim] = param_axis
    return P(*entries)

  shardings = {k: NamedSharding(mesh, spec(s)) for k, s in SHAPES.items()}
  params = jax.device_put({k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}, shardings)
  return mesh, factor_axis, shardings, params


def _make(optimizer, **kwargs):
  if optimizer == "shampoo":
    return s4.scale_by_shampoo4(**SHAMPOO, **kwargs)
  return s4.scale_by_soap4(**SOAP, **kwargs)


def _compiled_update(optimizer, layout, kind):
  mesh, axis, param_shardings, params = _setup(layout, kind)
  tx = _make(optimizer, mesh=mesh, mesh_axis=axis)
  shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh, axis=axis, params_sharding=param_shardings)
  state = jax.block_until_ready(jax.jit(tx.init, out_shardings=shardings)(params))
  update = jax.jit(tx.update, out_shardings=(param_shardings, shardings))
  return update.lower(params, state, params).compile()


def _whole_gradient_gathers(hlo_text):
  return [g for g in all_gathers(hlo_text)
          if g["dtype"].startswith(("f", "bf")) and g["elements"] >= SMALLEST_GRADIENT]


def test_all_gathers_helper_finds_a_whole_parameter_gather():
  mesh, _, shardings, params = _setup("fsdp", "auto")
  gather = jax.jit(lambda x: x * 2.0, out_shardings=NamedSharding(mesh, P()))
  found = _whole_gradient_gathers(gather.lower(params["a"]).compile().as_text())
  assert [g["shape"] for g in found] == [SHAPES["a"]]


# The default run covers both optimizers, both mesh kinds and both layouts; the slow run every combination.
@pytest.mark.parametrize("optimizer, layout, kind", [
    ("shampoo", "fsdp", "explicit"), ("soap", "2d", "auto"),
    pytest.param("shampoo", "fsdp", "auto", marks=pytest.mark.slow),
    pytest.param("shampoo", "2d", "auto", marks=pytest.mark.slow),
    pytest.param("shampoo", "2d", "explicit", marks=pytest.mark.slow),
    pytest.param("soap", "fsdp", "auto", marks=pytest.mark.slow),
    pytest.param("soap", "fsdp", "explicit", marks=pytest.mark.slow),
    pytest.param("soap", "2d", "explicit", marks=pytest.mark.slow),
    pytest.param("shampoo", "2d-data", "explicit", marks=pytest.mark.slow),
    pytest.param("soap", "2d-data", "auto", marks=pytest.mark.slow)])
def test_update_gathers_no_whole_gradient(optimizer, layout, kind):
  hlo = _compiled_update(optimizer, layout, kind).as_text()
  found = _whole_gradient_gathers(hlo)
  assert not found, f"all-gathers of whole gradients (>= {SMALLEST_GRADIENT} elements per device): {found}"
  assert unordered_collectives(hlo) == []  # every collective ordered with the refreshes (test_collective_order.py)
  assert "all-to-all" in hlo  # the blocks do move between devices


def _trajectory(tx, params, grads, shardings=None):
  """The updates of ``len(grads)`` steps from ``tx.init(params)``, on the host."""
  if shardings is None:
    state = tx.init(params)
    update = jax.jit(tx.update)
  else:
    state_shardings, param_shardings = shardings
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    update = jax.jit(tx.update, out_shardings=(param_shardings, state_shardings))
  out = []
  for g in grads:
    if shardings is not None:
      g = jax.device_put(g, shardings[1])
    u, state = jax.block_until_ready(update(g, state, params))
    out.append(jax.tree.map(np.asarray, u))
  return out


@pytest.mark.parametrize("optimizer, layout, kind", [
    ("shampoo", "fsdp", "explicit"),
    pytest.param("soap", "2d", "auto", marks=pytest.mark.slow),
    pytest.param("shampoo", "2d", "auto", marks=pytest.mark.slow),
    pytest.param("soap", "fsdp", "explicit", marks=pytest.mark.slow)])
def test_fsdp_update_matches_single_device(optimizer, layout, kind):
  mesh, axis, param_shardings, params = _setup(layout, kind)
  rng = np.random.default_rng(0)
  grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]
  tx = _make(optimizer, state_format="fp32", mesh=mesh, mesh_axis=axis)
  shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh, axis=axis, params_sharding=param_shardings)
  sharded = _trajectory(tx, params, grads, (shardings, param_shardings))
  with jax.default_device(CPUS[0]):
    single = _trajectory(_make(optimizer, state_format="fp32"), jax.device_put(jax.tree.map(np.asarray, params),
                                                                               CPUS[0]), grads)
  assert max(float(np.abs(w).max()) for w in single[-1].values()) > 0
  for step, (got, want) in enumerate(zip(sharded, single), start=1):
    scale = max(float(np.abs(w).max()) for w in want.values())  # 0 at SOAP's first call
    for k in SHAPES:
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=UPDATE_RTOL * scale, err_msg=f"step {step}, {k}")


# Leaves of rank 3 and 4 split over an explicit mesh axis: their 16 x 16 matrix views merge the split dimension
# with others ("k", "t") or keep it ("conv": the split output channels stay the columns). Square views: one
# gradient gives full-rank statistics, so SOAP's first basis is determined (as in the tree above).
HIGH_RANK = {"k": ((4, 4, 2, 8), 0), "conv": ((2, 2, 4, 16), 3), "t": ((4, 4, 16), 1)}


@pytest.mark.parametrize("optimizer, extra", [
    ("shampoo", {}), pytest.param("soap", {}, marks=pytest.mark.slow),
    # nu permuted (not rotated) at basis changes: the split blocks are gathered for the permutation
    pytest.param("soap", {"project_nu": False}, id="soap-permuted-nu", marks=pytest.mark.slow)])
def test_high_rank_leaves_split_over_an_explicit_axis_match_single_device(optimizer, extra):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                       devices=CPUS[:NUM_DEVICES])
  param_shardings = {k: NamedSharding(mesh, P(*([None] * dim + ["model"]))) for k, (_, dim) in HIGH_RANK.items()}
  params = jax.device_put({k: jnp.zeros(s, jnp.float32) for k, (s, _) in HIGH_RANK.items()}, param_shardings)
  rng = np.random.default_rng(0)
  grads = [{k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in HIGH_RANK.items()} for _ in range(STEPS)]
  tx = _make(optimizer, state_format="fp32", mesh=mesh, mesh_axis="data", **extra)
  shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh, axis="data", params_sharding=param_shardings)
  with jax.set_mesh(mesh):
    sharded = _trajectory(tx, params, grads, (shardings, param_shardings))
  with jax.default_device(CPUS[0]):
    single = _trajectory(_make(optimizer, state_format="fp32", **extra),
                         jax.device_put(jax.tree.map(np.asarray, params), CPUS[0]), grads)
  for step, (got, want) in enumerate(zip(sharded, single), start=1):
    scale = max(float(np.abs(w).max()) for w in want.values())
    for k in HIGH_RANK:
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=UPDATE_RTOL * scale, err_msg=f"step {step}, {k}")


def test_fsdp_train_state_per_device_is_near_an_even_split():
  row = fsdp_memory_table("gpt2_124m", [NUM_DEVICES])["rows"][NUM_DEVICES]
  assert row["params_per_device"] * NUM_DEVICES == row["params_total"]  # every GPT-2 leaf divides over 8
  assert row["opt_state_per_device"] < row["opt_state_total"] / 4  # the state is split, not replicated
  assert row["train_state_per_device"] <= 1.2 * row["train_state_total"] / NUM_DEVICES, row
