"""Sharded Shampoo factors on 8 virtual CPU devices (``mesh=``, ``state_sharding``).

``tests/conftest.py`` gives the CPU backend 8 devices before JAX starts; the
meshes here are built from ``jax.devices("cpu")`` and the single-device
references run on the first CPU device, so these tests also run on a GPU host.

Every result is blocked on (or pulled to the host) before the next program
starts: XLA's in-process CPU collectives can deadlock when a single-device
program runs concurrently with a sharded one that has collectives. The factors
are small (orders 16 and 8), which also keeps jaxlib's batched CPU QR from
splitting its batch over the thread pool (two such QRs at once can deadlock a
2-core machine).

How sharded and single-device results are compared, and the tolerances:

* Step by step, all formats: each sharded step is compared with the
  single-device step taken from the same state (the sharded state, unpadded,
  moved to one device). Updates must agree within ``1e-3 * max|update|`` and
  the dequantized statistics and roots of the real factors within
  ``1e-3 * max|matrix|``. The eigen format's statistic is compared as
  ``Vᵀ diag(λ) V``, because the basis of a null space (rank-deficient
  statistics, e.g. the order-16 right factor of the 8x16 leaf at step 2) is
  picked by rounding and its 4-bit codes may differ while the matrix agrees.
  Measured: at most 9e-7 (replicated gradients) and 1.6e-5 (FSDP, where the
  Gram matrices are summed over devices in another order): >= 60x headroom. Only if some 4-bit
  codes differ is the tolerance 0.15: one flipped eigenvector code moves the
  next update by 1-3.5 % of its largest entry (measured), while a misplaced,
  stale or padding factor changes it by order 1.
* Whole trajectories, ``"naive"`` and ``"fp32"`` only: the same tolerances.
  The ``"eigen"`` format is chaotic in the float rounding (perturbing a
  single-device run's gradients by one ulp changes its updates by up to ~0.5,
  of ~3, within 12 steps: a flipped 4-bit eigenvector code changes the next QR
  step), so it is compared step by step only.
"""

import dataclasses
import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_shampoo4 as s4
from optax_shampoo4 import factors as fct

NUM_DEVICES = 8
CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(CPUS) < NUM_DEVICES,
    reason=f"needs {NUM_DEVICES} CPU devices (tests/conftest.py sets jax_num_cpu_devices)")

FORMATS = ("eigen", "naive", "fp32")
# T1 = 2, T2 = 4 over 8 steps: statistics at steps 2, 4, 6, 8, roots at 4 and 8,
# plain steps 1, 3, 5, 7. Order-16 factors are 4-bit (quant_block 8), the
# order-8 one float32. Square-ish blocks give full-rank statistics by the first
# root refresh, so the comparisons are well conditioned.
CONFIG = dict(stats_every=2, root_every=4, min_quant_order=16, quant_block=8)
STEPS = 8
UPDATE_RTOL = 1e-3
STATE_RTOL = 1e-3
FLIPPED_RTOL = 0.15


def _params():
  # Buckets: order 16 (4-bit), 3 real factors; order 8 (float32), 1 real factor.
  # Both are padded to 8 slots over 8 devices.
  return {"w": jnp.ones((16, 16)), "u": jnp.ones((8, 16)), "b": jnp.zeros((16,))}


# Both kinds of mesh: "auto" (layouts are hints to XLA, as in Mesh(np.array(devices))) and "explicit" (the
# default of jax.make_mesh: layouts are part of the arrays' types and shard_map checks them).
MESH_KINDS = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}


def _mesh(shape=(NUM_DEVICES,), names=("data",), kind="auto"):
  return jax.make_mesh(shape, names, axis_types=(MESH_KINDS[kind],) * len(shape),
                       devices=CPUS[:math.prod(shape)])


def _kind_params(values, default_explicit=(), slow_auto=()):
  """``pytest.param``s over ``values`` x mesh kinds; auto keeps the plain id (``[eigen]``) and runs in the slow
  run if listed in ``slow_auto``, explicit ones get ``-explicit`` and run in the slow run unless listed in
  ``default_explicit``."""
  out = [pytest.param((v, "auto"), id=v, marks=pytest.mark.slow if v in slow_auto else ()) for v in values]
  out += [pytest.param((v, "explicit"), id=f"{v}-explicit",
                       marks=() if v in default_explicit else pytest.mark.slow) for v in values]
  return out


def _grads(params, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
          for _ in range(steps)]


def _is_bucket(node):
  return isinstance(node, (fct.EigenFactors, fct.MatrixFactors))


def _bucket_counts(state):
  """``{bucket name: number of factors}`` of every Shampoo state inside ``state``."""
  counts = {}
  for node in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, s4.ScaleByShampoo4State)):
    if isinstance(node, s4.ScaleByShampoo4State):
      counts.update({name: jax.tree.leaves(b)[0].shape[0] for name, b in node.factors.items()})
  return counts


def _to_host(tree):
  return jax.tree.map(np.asarray, tree)


def _unpadded(state, counts, device):
  """``state`` on one device, with the padding slots of every bucket dropped."""

  def one(path, node):
    if _is_bucket(node):
      name = path[-1].key
      return jax.tree.map(lambda x: jax.device_put(np.asarray(x)[:counts[name]], device), node)
    return jax.device_put(np.asarray(node), device)

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_bucket)


def _bucket_leaves(state):
  """``[(path string, leaf)]`` of the Shampoo factor leaves of ``state``."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = jax.tree_util.keystr(path)
    if ".factors[" in keys:
      out.append((keys, leaf))
  return out


def _factor_matrices(state, counts):
  """``{(bucket, "stat" | "root"): float32[k, n, n]}`` of the real factors, dequantized.

  The eigen format's statistic is rebuilt as ``Vᵀ diag(λ) V`` from its stored
  eigenvectors (rows of ``V``): unlike the eigenvectors themselves it does not
  depend on the basis chosen for a (numerically) repeated eigenvalue, e.g. the
  null space of a rank-deficient statistic, which rounding picks arbitrarily.
  """
  matrices = {}
  with jax.default_device(CPUS[0]):
    for node in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, s4.ScaleByShampoo4State)):
      if not isinstance(node, s4.ScaleByShampoo4State):
        continue
      for name, bucket in node.factors.items():
        bucket = jax.tree.map(lambda x, k=counts[name]: np.asarray(x)[:k], bucket)
        if isinstance(bucket, fct.EigenFactors):
          rows = np.asarray(fct.load(bucket.eigvecs))
          stat = np.einsum("kin,ki,kim->knm", rows, bucket.eigvals, rows)
        else:
          stat = np.asarray(fct.load(bucket.stats))
        matrices[name, "stat"] = stat
        matrices[name, "root"] = np.asarray(fct.load(bucket.root))
  return matrices


def _compare_states(sharded, single, counts):
  """Over the real (unpadded) factors: the largest relative difference of the
  dequantized statistics and roots, and the fraction of 4-bit code bytes that differ."""
  a, b = _factor_matrices(sharded, counts), _factor_matrices(single, counts)
  assert a.keys() == b.keys()
  worst = max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-30)) for k in a)
  flat = dict(_bucket_leaves(single))
  differing = total = 0
  for keys, leaf in _bucket_leaves(sharded):
    if leaf.dtype == np.uint8:
      name = keys.split("['")[1].split("']")[0]
      x, y = np.asarray(leaf)[:counts[name]], np.asarray(flat[keys])[:counts[name]]
      assert x.shape == y.shape, keys
      differing += int(np.sum(x != y))
      total += x.size
  return worst, differing / max(total, 1)


def _max_rel_diff(a, b):
  """``max|a - b| / max|b|`` over all leaves of two trees of updates."""
  a, b = jax.tree.leaves(_to_host(a)), jax.tree.leaves(_to_host(b))
  scale = max(float(np.max(np.abs(y))) for y in b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) / max(scale, 1e-30)


def _assert_step_matches(update8, update1, state8, state1, counts, what):
  worst_state, codes_differ = _compare_states(state8, state1, counts)
  tol = (UPDATE_RTOL, STATE_RTOL) if codes_differ == 0 else (FLIPPED_RTOL, FLIPPED_RTOL)
  assert _max_rel_diff(update8, update1) <= tol[0], f"{what}: updates differ"
  assert worst_state <= tol[1], (
      f"{what}: factors differ by {worst_state:.2e} ({codes_differ:.2%} of the codes differ)")


@dataclasses.dataclass
class Run:
  """A sharded trajectory and its single-device references, for one format."""

  state_format: str
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation  # built with mesh=
  update: object  # jax.jit(tx.update)
  shardings: object  # state_sharding of the initial state
  counts: dict
  grads: list
  states: list  # sharded states, before step 1 .. after step STEPS
  updates: list  # sharded updates per step
  forced: list  # (single-device update, state) from the sharded input state, per step
  free: list  # (single-device update, state) of a free single-device run, per step
  update1: object  # jax.jit of the single-device update
  mesh_kind: str = "auto"  # a key of MESH_KINDS


@functools.cache
def _run(state_format, kind="auto"):
  """Runs (once per format, mesh kind and session) the sharded trajectory and its references."""
  mesh = _mesh(kind=kind)
  params = _params()
  tx8 = s4.scale_by_shampoo4(state_format=state_format, mesh=mesh, **CONFIG)
  tx1 = s4.scale_by_shampoo4(state_format=state_format, **CONFIG)
  shardings = s4.state_sharding(jax.eval_shape(tx8.init, params), mesh)
  state8 = jax.block_until_ready(jax.jit(tx8.init, out_shardings=shardings)(params))
  update8, update1 = jax.jit(tx8.update), jax.jit(tx1.update)
  grads = _grads(params, STEPS)
  cpu0 = CPUS[0]
  with jax.default_device(cpu0):
    state1 = jax.block_until_ready(tx1.init(params))
  counts = _bucket_counts(state1)

  states, updates, forced, free = [state8], [], [], []
  for g in grads:
    u8, state8 = jax.block_until_ready(update8(g, states[-1]))
    g1 = jax.device_put(g, cpu0)
    forced.append(_to_host(update1(g1, _unpadded(states[-1], counts, cpu0))))
    u1, state1 = jax.block_until_ready(update1(g1, state1))
    free.append((_to_host(u1), state1))
    states.append(state8)
    updates.append(_to_host(u8))
  return Run(state_format, mesh, tx8, update8, shardings, counts, grads, states, updates,
             forced, free, update1, kind)


@pytest.fixture(params=_kind_params(FORMATS, default_explicit=("eigen",)))
def run(request):
  return _run(*request.param)


@pytest.fixture(params=_kind_params(["eigen"], default_explicit=("eigen",)))
def eigen_run(request):
  return _run(*request.param)


@pytest.mark.parametrize("run", _kind_params(FORMATS, default_explicit=("eigen",), slow_auto=FORMATS), indirect=True)
def test_sharded_update_matches_single_device_step_by_step(run):
  for step in range(STEPS):
    update1, state1 = run.forced[step]
    _assert_step_matches(run.updates[step], update1, run.states[step + 1], state1, run.counts,
                         f"{run.state_format}, step {step + 1}")


@pytest.mark.slow
@pytest.mark.parametrize("case", _kind_params(["naive", "fp32"]))  # not eigen: see the module doc
def test_sharded_trajectory_matches_single_device(case):
  run = _run(*case)
  for step in range(STEPS):
    update1, state1 = run.free[step]
    _assert_step_matches(run.updates[step], update1, run.states[step + 1], state1, run.counts,
                         f"{run.state_format}, step {step + 1}")
    if step == STEPS - 1:  # the preconditioner was really used: updates are not the gradients
      assert _max_rel_diff(run.updates[step], run.grads[step]) > 0.1


@pytest.mark.parametrize("eigen_run", _kind_params(["eigen"], default_explicit=("eigen",), slow_auto=("eigen",)),
                         indirect=True)
def test_padding_slots_never_influence_updates(eigen_run):
  """Garbage in every padding slot of every bucket changes no update and no real factor."""
  run = eigen_run
  rng = np.random.default_rng(1)

  def corrupt(path, leaf):
    keys = jax.tree_util.keystr(path)
    if ".factors[" not in keys:
      return leaf
    name = keys.split("['")[1].split("']")[0]
    host = np.array(leaf)
    pad = host[run.counts[name]:]
    if host.dtype == np.uint8:
      pad[...] = rng.integers(0, 256, pad.shape)
    else:
      pad[...] = 10.0 * rng.standard_normal(pad.shape)
    return jax.device_put(host, leaf.sharding)

  state = jax.tree_util.tree_map_with_path(corrupt, run.states[0])
  assert run.counts and all(c % NUM_DEVICES for c in run.counts.values())  # really padded
  for step, g in enumerate(run.grads):
    update, state = jax.block_until_ready(run.update(g, state))
    assert _max_rel_diff(update, run.updates[step]) <= 1e-6, f"step {step + 1}"
    worst, codes_differ = _compare_states(state, run.states[step + 1], run.counts)
    assert worst <= 1e-6 and codes_differ == 0, f"step {step + 1}"


def test_factor_leaves_are_split_over_the_devices(run):
  state = run.states[0]
  leaves = _bucket_leaves(state)
  kinds = {leaf.dtype for _, leaf in leaves}
  if run.state_format != "fp32":
    assert np.dtype(np.uint8) in kinds  # 4-bit codes are among the split leaves
  for keys, leaf in leaves:
    assert _full_spec(leaf.sharding, leaf.ndim) == ("data",) + (None,) * (leaf.ndim - 1), keys
    shards = leaf.addressable_shards
    assert len(shards) == NUM_DEVICES and {s.device for s in shards} == set(CPUS[:NUM_DEVICES])
    rows = leaf.shape[0] // NUM_DEVICES
    starts = sorted(s.index[0].start for s in shards)
    assert starts == list(range(0, leaf.shape[0], rows)), keys  # disjoint 1/8 slices
    for s in shards:
      assert s.data.shape == (rows,) + leaf.shape[1:], keys
      np.testing.assert_array_equal(np.asarray(s.data), np.asarray(leaf)[s.index])
  # Everything else (step count, failure counters) is replicated.
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if ".factors[" not in jax.tree_util.keystr(path):
      assert _full_spec(leaf.sharding, leaf.ndim) == (None,) * leaf.ndim


def _full_spec(sharding, ndim):
  """The sharding's spec with one entry per dimension (explicit meshes spell trailing Nones, auto ones may not)."""
  spec = tuple(sharding.spec)
  return spec + (None,) * (ndim - len(spec))


def _signature(state):
  return [(jax.tree_util.keystr(p), jax.typeof(x), x.sharding.mesh, _full_spec(x.sharding, x.ndim))
          for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]


def test_update_keeps_state_shardings(run):
  """``jax.typeof`` and sharding of every state leaf survive refresh and plain steps."""
  want = _signature(run.states[0])
  for step, state in enumerate(run.states[1:], start=1):
    assert _signature(state) == want, f"step {step}"


def test_out_shardings_pin_the_state_layout(eigen_run):
  """The user-side guarantee: ``jit(update, out_shardings=...)`` keeps the layout exactly."""
  run = eigen_run
  replicated = NamedSharding(run.mesh, P())
  update = jax.jit(run.tx.update, out_shardings=(replicated, run.shardings))
  state, want = run.states[0], _signature(run.states[0])
  for step, g in enumerate(run.grads[:4], start=1):  # plain, stats, plain, stats + roots
    out, state = jax.block_until_ready(update(g, state))
    assert _signature(state) == want, f"step {step}"
    assert _max_rel_diff(out, run.updates[step - 1]) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("kind", MESH_KINDS)
def test_fsdp_params_sharded_along_first_axis(kind):
  """Params, grads and Adam's moments split over "data" along their first axis."""
  mesh = _mesh(kind=kind)
  params = _params()
  split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  param_shardings = {k: split if p.shape[0] % NUM_DEVICES == 0 else replicated
                     for k, p in params.items()}
  assert all(s == split for s in param_shardings.values())
  params = jax.device_put(params, param_shardings)
  kwargs = dict(learning_rate=1e-2, **CONFIG)
  tx8 = s4.adamw_shampoo4(mesh=mesh, **kwargs)
  tx1 = s4.adamw_shampoo4(**kwargs)
  shardings = s4.state_sharding(jax.eval_shape(tx8.init, params), mesh,
                                params_sharding=param_shardings)
  state8 = jax.block_until_ready(jax.jit(tx8.init, out_shardings=shardings)(params))

  adam = state8[1]
  assert isinstance(adam, optax.ScaleByAdamState)
  for moments in (adam.mu, adam.nu):
    for k, leaf in moments.items():
      assert leaf.sharding == param_shardings[k], k
      assert all(s.data.shape[0] == leaf.shape[0] // NUM_DEVICES for s in leaf.addressable_shards)
  assert all(_full_spec(leaf.sharding, leaf.ndim)[0] == "data" for _, leaf in _bucket_leaves(state8))

  counts = _bucket_counts(jax.eval_shape(tx1.init, params))
  update8 = jax.jit(tx8.update, out_shardings=(param_shardings, shardings))
  update1 = jax.jit(tx1.update)
  cpu0 = CPUS[0]
  params1 = jax.device_put(_to_host(params), cpu0)
  for step, g in enumerate(_grads(params, 4, seed=2), start=1):  # through the first root refresh
    g8 = jax.device_put(g, param_shardings)
    out8, new8 = jax.block_until_ready(update8(g8, state8, params))
    out1, new1 = update1(jax.device_put(g, cpu0), _unpadded(state8, counts, cpu0), params1)
    out1, new1 = jax.block_until_ready((out1, new1))
    _assert_step_matches(out8, out1, new8, new1, counts, f"FSDP step {step}")
    for k, leaf in out8.items():
      assert leaf.sharding == param_shardings[k], k
    for moments in (new8[1].mu, new8[1].nu):
      for k, leaf in moments.items():
        assert leaf.sharding == param_shardings[k], k
    state8 = new8


@pytest.mark.parametrize("eigen_run", _kind_params(["eigen"], default_explicit=("eigen",), slow_auto=("eigen",)),
                         indirect=True)
def test_two_dimensional_mesh_splits_factors_over_data(eigen_run):
  """A ("data", "model") = (4, 2) mesh: factors split over "data", copied over "model"."""
  run = eigen_run
  mesh = _mesh((4, 2), ("data", "model"), kind=run.mesh_kind)
  params = _params()
  tx = s4.scale_by_shampoo4(mesh=mesh, mesh_axis="data", **CONFIG)
  shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh, axis="data")
  state = jax.block_until_ready(jax.jit(tx.init, out_shardings=shardings)(params))
  for keys, leaf in _bucket_leaves(state):
    assert leaf.shape[0] % 4 == 0 and leaf.shape[0] % 8, keys  # padded to 4, not 8
    assert _full_spec(leaf.sharding, leaf.ndim)[0] == "data", keys
    rows = leaf.shape[0] // 4
    assert all(s.data.shape[0] == rows for s in leaf.addressable_shards), keys
  # Gradients split over "model" along their last axis (tensor-parallel style).
  grad_shardings = {"w": NamedSharding(mesh, P(None, "model")),
                    "u": NamedSharding(mesh, P(None, "model")), "b": NamedSharding(mesh, P("model"))}
  update = jax.jit(tx.update, out_shardings=(NamedSharding(mesh, P()), shardings))
  cpu0 = CPUS[0]
  for step, g in enumerate(run.grads[:4], start=1):  # through the first root refresh
    out, new = jax.block_until_ready(update(jax.device_put(g, grad_shardings), state))
    out1, new1 = jax.block_until_ready(
        run.update1(jax.device_put(g, cpu0), _unpadded(state, run.counts, cpu0)))
    _assert_step_matches(out, out1, new, new1, run.counts, f"2-D mesh step {step}")
    state = new


def test_state_sharding_needs_a_transform_built_with_the_mesh():
  mesh = _mesh()
  abstract = jax.eval_shape(s4.scale_by_shampoo4(**CONFIG).init, _params())
  with pytest.raises(ValueError, match=r"cannot be split over 8 devices.*mesh=<this mesh>"):
    s4.state_sharding(abstract, mesh)
  abstract = jax.eval_shape(s4.scale_by_shampoo4(mesh=mesh, **CONFIG).init, _params())
  with pytest.raises(ValueError, match="mesh_axis"):
    s4.state_sharding(abstract, mesh, axis="model")


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(mesh="x"), TypeError, "mesh"),
    (dict(mesh=8), TypeError, "mesh"),
    (dict(mesh_axis="model"), ValueError, "mesh_axis"),
    (dict(mesh_axis=None), ValueError, "mesh_axis"),
])
def test_bad_mesh_arguments_raise_naming_them(kwargs, error, name):
  if "mesh" not in kwargs:
    kwargs = dict(kwargs, mesh=_mesh())
  with pytest.raises(error, match=f"{name}="):
    s4.scale_by_shampoo4(**kwargs)
  with pytest.raises(error, match=f"{name}="):
    s4.adamw_shampoo4(1e-3, **kwargs)


EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distributed.py"


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < NUM_DEVICES,
                    reason="the example uses the default backend's devices")
def test_distributed_example_trains(capsys):
  pytest.importorskip("flax")
  pytest.importorskip("sklearn")
  spec = importlib.util.spec_from_file_location("distributed_example", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  result = module.main(["--steps", "30", "--devices", "8"])
  losses = result["losses"]
  assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
  assert result["devices"] == 8
  assert 0 < result["state_bytes_per_device"] < result["state_bytes_total"]
  assert result["factor_bytes_per_device"] * 8 == result["factor_bytes_total"]  # split 8 ways
  after = result["state_bytes_after"]  # the layout survived the training steps
  assert (after["per_device"], after["factors_per_device"]) == (
      result["state_bytes_per_device"], result["factor_bytes_per_device"])
  assert "per-device optimizer state" in capsys.readouterr().out


@pytest.mark.parametrize("bits, kind", [
    pytest.param(8, "auto", marks=pytest.mark.slow), (8, "explicit"), pytest.param(4, "auto", marks=pytest.mark.slow),
    pytest.param(4, "explicit", marks=pytest.mark.slow)])
def test_quantized_moments_are_sharded_like_their_parameters(bits, kind):
  """``moment_bits=8|4``: codes and block scales split like the parameter (FSDP), on both kinds of mesh.

  (Under explicit sharding the codebook lookups are gathers with split indices, given their output layout.)
  """
  mesh = _mesh(kind=kind)
  params = {"w": jnp.ones((64, 128)), "b": jnp.zeros((16,))}
  split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  param_shardings = {"w": split, "b": replicated}
  kwargs = dict(learning_rate=1e-2, moment_bits=bits, **CONFIG)
  tx8, tx1 = s4.adamw_shampoo4(mesh=mesh, **kwargs), s4.adamw_shampoo4(**kwargs)
  shardings = s4.state_sharding(jax.eval_shape(tx8.init, params), mesh, params_sharding=param_shardings)
  params8 = jax.device_put(params, param_shardings)
  state8 = jax.block_until_ready(jax.jit(tx8.init, out_shardings=shardings)(params8))
  adam = state8[1]
  codes = [adam.mu["w"], adam.nu["w"]]
  assert all(c.dtype == np.uint8 for c in codes)  # really quantized
  block_scales = [x for x in (adam.mu_scales["w"], adam.nu_scales["w"]) if x.ndim == 2]
  for leaf in codes + block_scales:
    assert _full_spec(leaf.sharding, leaf.ndim)[0] == "data"
    assert all(s.data.shape[0] == leaf.shape[0] // NUM_DEVICES for s in leaf.addressable_shards)
  for leaf in (adam.mu_scales["b"], adam.nu_scales["b"]):  # a small tensor's scalar placeholder
    assert leaf.ndim == 0 and leaf.sharding.spec == P()

  update8 = jax.jit(tx8.update, out_shardings=(param_shardings, shardings))
  update1 = jax.jit(tx1.update)
  counts = _bucket_counts(jax.eval_shape(tx1.init, params))
  cpu0 = CPUS[0]
  params1 = jax.device_put(params, cpu0)
  for step, g in enumerate(_grads(params, 2, seed=3), start=1):
    out8, new8 = jax.block_until_ready(update8(jax.device_put(g, param_shardings), state8, params8))
    out1, _ = jax.block_until_ready(update1(jax.device_put(g, cpu0), _unpadded(state8, counts, cpu0), params1))
    assert _max_rel_diff(_to_host(out8), _to_host(out1)) <= UPDATE_RTOL, f"step {step}"
    assert _signature(new8) == _signature(state8), f"step {step}"  # the layout survives the step
    state8 = new8


def test_arrays_on_another_explicit_mesh_raise_naming_the_axes():
  """The transform's mesh and the arrays' (explicit) mesh must have the same axes."""
  tx = s4.scale_by_shampoo4(mesh=_mesh(kind="explicit"), **CONFIG)
  other = _mesh(kind="explicit", names=("batch",))
  params = jax.device_put(_params(), NamedSharding(other, P()))
  state = jax.device_put(tx.init(_params()), NamedSharding(other, P()))
  with pytest.raises(ValueError, match=r"'batch': 8.*'data': 8"):
    jax.jit(tx.update)(params, state)
