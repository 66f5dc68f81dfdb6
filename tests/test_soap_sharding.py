"""scale_by_soap4 with ``mesh=``: sharded results equal single-device ones (8 virtual CPU devices).

``tests/conftest.py`` gives the CPU backend 8 devices. Each bucket's factor
axis is padded to a multiple of 8 and split; the refreshes run under
``shard_map``. Every result is pulled to the host before the next program runs
(XLA's in-process CPU collectives can deadlock when a single-device program
runs next to a sharded one).

* ``"fp32"``: whole trajectories agree (updates within ``1e-4 * max|update|``).
* ``"eigen"``: step by step, from the same state (a flipped 4-bit code changes
  the next QR step, so free trajectories drift apart by rounding, as for
  Shampoo): updates and eigenvalues agree within ``1e-4`` relative.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as s4
from benchmarks.hlo_flops import dot_flops

CPUS = jax.devices("cpu")
NUM_DEVICES = 8
pytestmark = pytest.mark.skipif(len(CPUS) < NUM_DEVICES, reason="needs 8 CPU devices (tests/conftest.py)")
# Refreshes at calls 1, 3, 5; order 16 quantized (4-bit, blocks of 8), order 8 float32; "e" is rotated on its
# right side only (40 > max_precond_dim): its block is cut into row chunks over the devices.
CONFIG = dict(precondition_every=2, min_quant_order=16, quant_block=8, shampoo_beta=0.9, max_precond_dim=16)
STEPS = 6
RTOL = 1e-4


def _params():
  return {"w": jnp.ones((16, 16)), "u": jnp.ones((8, 16)), "e": jnp.ones((40, 8)), "b": jnp.zeros((16,))}


def _grads(params, seed=0):
  rng = np.random.default_rng(seed)
  return [{k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()} for _ in range(STEPS)]


def _mesh(kind="auto"):
  """An 8-device mesh; ``kind``: "auto" or "explicit" (the default axis type of ``jax.make_mesh``)."""
  axis_type = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}[kind]
  return jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,), devices=CPUS[:NUM_DEVICES])


def _to_host(tree):
  return jax.tree.map(np.asarray, tree)


def _unpadded(state, counts, device):
  """The sharded ``state`` on one device, without the padding factors."""
  factors = {name: jax.tree.map(lambda x, n=counts[name]: np.asarray(x)[:n], bucket)
             for name, bucket in state.factors.items()}
  return jax.device_put(_to_host(state._replace(factors=factors)), device)


def _assert_close(got, want, what):
  for key in want:
    scale = max(float(np.abs(want[key]).max()), 1e-30)
    np.testing.assert_allclose(got[key], want[key], rtol=0, atol=RTOL * scale, err_msg=f"{what}, leaf {key}")


def _transforms(state_format, kind="auto", carry="decoded", **extra):
  mesh = _mesh(kind)
  sharded = s4.scale_by_soap4(state_format=state_format, mesh=mesh, carry=carry, **CONFIG, **extra)
  single = s4.scale_by_soap4(state_format=state_format, carry=carry, **CONFIG, **extra)
  return mesh, sharded, single


@pytest.mark.slow
@pytest.mark.parametrize("state_format, kind, carry, extra", [
    pytest.param("fp32", "auto", "decoded", {}, id="fp32"), pytest.param("eigen", "auto", "decoded", {}, id="eigen"),
    pytest.param("fp32", "explicit", "decoded", {}, id="fp32-explicit", marks=pytest.mark.slow),
    pytest.param("eigen", "explicit", "decoded", {}, id="eigen-explicit", marks=pytest.mark.slow),
    # The carry by the refresh's float32 eigenvectors: gathered from the devices that refreshed them.
    pytest.param("eigen", "auto", "refreshed", {}, id="eigen-refreshed"),
    pytest.param("eigen", "explicit", "refreshed", {}, id="eigen-explicit-refreshed"),
    # nu permuted with the refreshed eigenpairs' order instead of rotated: the order gathered before indexing.
    pytest.param("eigen", "explicit", "decoded", {"project_nu": False}, id="eigen-explicit-permuted-nu")])
def test_sharded_soap_matches_single_device(state_format, kind, carry, extra):
  mesh, sharded, single = _transforms(state_format, kind, carry, **extra)
  params = _params()
  grads = _grads(params)
  device = CPUS[0]
  single_params = jax.device_put(params, device)
  counts = {name: jax.tree.leaves(b)[0].shape[0] for name, b in single.init(single_params).factors.items()}
  state = jax.jit(sharded.init, out_shardings=s4.state_sharding(jax.eval_shape(sharded.init, params), mesh))(params)
  assert all(jax.tree.leaves(b)[0].shape[0] == -(-counts[name] // NUM_DEVICES) * NUM_DEVICES
             for name, b in state.factors.items())
  free_state = jax.device_put(single.init(single_params), device)
  sharded_update, single_update = jax.jit(sharded.update), jax.jit(single.update)
  for step, g in enumerate(grads):
    from_same = _to_host(single_update(jax.device_put(g, device), _unpadded(state, counts, device),
                                       single_params))
    updates, state = sharded_update(g, state, params)
    updates, state = _to_host(updates), jax.block_until_ready(state)
    _assert_close(updates, from_same[0], f"{state_format}, step {step + 1}, from the same state")
    for name in counts:
      want = from_same[1].factors[name].eigvals
      got = np.asarray(state.factors[name].eigvals)[:counts[name]]
      np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max())
    if state_format == "fp32":  # deterministic: whole trajectories agree too, where the basis is determined
      free, free_state = single_update(jax.device_put(g, device), free_state, single_params)
      # "u" (8x16) gives a rank-8 right statistic: its basis inside the null space is fixed by rounding noise
      # (the devices form their own grams, in another order), so only its every-step check above applies.
      full_rank = {k: v for k, v in _to_host(free).items() if k != "u"}
      _assert_close(updates, full_rank, f"fp32, step {step + 1}, free trajectory")
      free_state = jax.block_until_ready(free_state)
  assert int(state.failed_refreshes) == 0
  assert math.isclose(float(np.abs(updates["w"]).max()), float(np.abs(from_same[0]["w"]).max()), rel_tol=1e-3)


# Eight 64x64 blocks and one block preconditioned on its right side only (2048 > max_precond_dim).
WORK_SHAPES = {**{f"w{i}": (64, 64) for i in range(8)}, "embedding": (2048, 32)}
WORK_CONFIG = dict(max_precond_dim=64, min_quant_order=16)


def _every_step_flops(mesh):
  tx = s4.scale_by_soap4(mesh=mesh, **WORK_CONFIG)
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in WORK_SHAPES.items()}
  state = jax.eval_shape(tx.init, params)
  if mesh is not None:
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                         s4.state_sharding(state, mesh))
  return dot_flops(jax.jit(tx.update).lower(params, state).compile().as_text())


def test_every_step_work_is_split_over_the_mesh():
  """Per-device matrix-product flops of a plain step and of the refresh branch on 8 devices, from the compiled programs.

  Each device decodes and projects (head tiers) only the bases of its own
  blocks, forms the changes of basis of those only at a refresh, and the
  block with one factor is cut into row chunks like the others; before, every
  device projected every basis (about as many flops as the rotations) and
  formed every change of basis, and computed the one-sided block whole: 0.49x
  one device's plain step, 0.38x its refresh branch.
  """
  flops1, flops8 = _every_step_flops(None), _every_step_flops(_mesh())
  rotations = sum(2 * (2 * m * m * n * (m <= 64) + 2 * m * n * n) for m, n in WORK_SHAPES.values())
  assert flops1["every_call"] >= rotations  # every rotation counted (plus the projections of the tiers)
  assert flops8["every_call"] <= 1.5 * flops1["every_call"] / NUM_DEVICES
  assert flops8["in_branches"] <= 2 * flops1["in_branches"] / NUM_DEVICES
