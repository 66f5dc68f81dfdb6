"""Statistics steps split by owner: each device forms only its own factors' Gram matrices.

On 8 virtual CPU devices (``tests/conftest.py``):

* the static tables of :mod:`optax_shampoo4.owned_grams` give every real
  factor exactly one (device, position), the one its bucket index says
  (contiguous shares), with the right block and side;
* each device's blocks (:func:`~optax_shampoo4.owned_grams.owned_blocks`,
  split over the devices) give, under ``shard_map``, a share equal to the float64 ``G Gᵀ`` /
  ``Gᵀ G`` of its factors (zero for padding factors). Float32 error bound:
  an entry of ``X Xᵀ`` (``X`` with ``n`` columns) is off by at most
  ``γ_n Σ_j |x_ij x_kj| <= γ_n max_i (X Xᵀ)_ii`` (Cauchy-Schwarz), with
  ``γ_n = n u / (1 - n u)``, ``u = 2⁻²⁴``; ``n <= 32`` here, so
  ``2e-6 · max|gram|``; the tolerance ``1e-5 · max|gram|`` has 5x headroom;
* the compiled statistics step (:meth:`FactorEngine.refresh_stats`) has
  per-device matrix-product flops (its HLO's dots) equal to the tables'
  count, and at most 0.2x those of the single-device program; its refreshed
  statistics match the single-device ones (float32 format: the same bound).

Every result is blocked on before the next program starts (XLA's in-process
CPU collectives can deadlock otherwise).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from benchmarks.hlo_flops import dot_flops
from optax_shampoo4 import engine, partition
from optax_shampoo4 import factors as fct
from optax_shampoo4.owned_grams import owned_blocks, owned_gram_tables, owned_grams

NUM_DEVICES = 8
CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(
    len(CPUS) < NUM_DEVICES,
    reason=f"needs {NUM_DEVICES} CPU devices (tests/conftest.py sets jax_num_cpu_devices)")

# max_order 16: "w{i}" (32, 24) -> (16, 16) x 2 and (16, 8) x 2 each; "v" (64, 32) -> (16, 16) x 8;
# order 16 is 4-bit, order 8 float32; the bias passes through.
SHAPES = [(32, 24)] * 8 + [(64, 32), (16,)]
MAX_ORDER = 16
GRAM_RTOL = 1e-5
MESH_KINDS = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}


def _mesh(kind="auto"):
  return jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(MESH_KINDS[kind],), devices=CPUS)


def _plan(shapes, num_shards):
  return partition.make_plan(shapes, MAX_ORDER, MAX_ORDER, True, bucket_multiple=num_shards)


def _matrices(plan, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(lp.matrix_shape).astype(np.float32) if lp.preconditioned else None
          for lp in plan.leaves]


def _float64_gram(plan, matrices, slot):
  leaf, block_index, side = slot
  b = plan.leaves[leaf].blocks[block_index]
  g = np.asarray(matrices[leaf], np.float64)[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
  return g @ g.T if side == "left" else g.T @ g


@pytest.mark.parametrize("shapes, num_shards", [
    (SHAPES, 8), (SHAPES, 3), ([(48, 40), (16, 16), (8, 24), (16,)], 4), ([(5, 7)], 2)])
def test_tables_give_every_factor_to_its_owner_once(shapes, num_shards):
  plan = _plan(shapes, num_shards)
  tables = owned_gram_tables(plan, num_shards)
  sizes = dict(plan.bucket_sizes)
  for key, slots in plan.factor_slots().items():
    table = tables[key.name]
    assert table.share * num_shards == sizes[key]
    seen = {}
    for group in table.groups:
      assert len({len(p) for p in group.picks}) == 1 and len(group.picks) == num_shards
      for device, (picks, positions) in enumerate(zip(group.picks, group.positions)):
        for pick, position in zip(picks, positions):
          if pick == len(group.blocks):
            assert position == table.share  # padding goes to the dropped row
            continue
          index = device * table.share + position
          assert index not in seen
          leaf, rows, cols, side = group.blocks[pick]
          seen[index] = (leaf, rows, cols, side)
    assert sorted(seen) == list(range(len(slots)))
    for index, (leaf, block_index, side) in enumerate(slots):
      b = plan.leaves[leaf].blocks[block_index]
      assert seen[index] == (leaf, b.rows, b.cols, side)


@pytest.mark.parametrize("kind", MESH_KINDS)
def test_each_device_forms_its_own_grams(kind):
  plan = _plan(SHAPES, NUM_DEVICES)
  tables = owned_gram_tables(plan, NUM_DEVICES)
  matrices = _matrices(plan)
  mesh = _mesh(kind)
  for key, slots in plan.factor_slots().items():
    table = tables[key.name]

    def share(blocks, table=table):
      return owned_grams(table, blocks, jax.lax.axis_index("data"))

    blocks = owned_blocks(table, [None if m is None else jnp.asarray(m) for m in matrices], NUM_DEVICES)
    got = jax.block_until_ready(jax.jit(jax.shard_map(
        share, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))(
            jax.device_put(blocks, jax.sharding.NamedSharding(mesh, P("data")))))
    got = np.asarray(got)
    assert got.shape == (dict(plan.bucket_sizes)[key], key.order, key.order)
    for index, slot in enumerate(slots):
      want = _float64_gram(plan, matrices, slot)
      np.testing.assert_allclose(got[index], want, rtol=0, atol=GRAM_RTOL * np.abs(want).max(),
                                 err_msg=f"{key.name}[{index}] {slot}")
    assert not np.any(got[len(slots):])  # padding factors get zero matrices


def _table_flops(plan, num_shards):
  """Per-device flops of the Gram products the tables schedule (padding included)."""
  total = 0
  for table in owned_gram_tables(plan, num_shards).values():
    for group in table.groups:
      _, (r0, r1), (c0, c1), side = group.blocks[0]
      m, n = (r1 - r0, c1 - c0) if side == "left" else (c1 - c0, r1 - r0)
      total += len(group.picks[0]) * 2 * m * m * n
  return total


def _statistics_step(plan, mesh, state_format):
  factor_engine = engine.FactorEngine(fct.FactorConfig(state_format=state_format), MAX_ORDER, MAX_ORDER, mesh)
  buckets = factor_engine.init_buckets(plan, jnp.float32(1e-6))
  matrices = [None if m is None else jnp.asarray(m) for m in _matrices(plan, seed=1)]
  step = jax.jit(lambda b, m: factor_engine.refresh_stats(b, plan, m, jnp.float32(0.5)))
  return step.lower(buckets, matrices).compile(), buckets, matrices


def test_statistics_step_flops_per_device_split_by_owner():
  """fp32 format (its statistics update has no other products): dots = the tables' Gram products."""
  plan1, plan8 = _plan(SHAPES, 1), _plan(SHAPES, NUM_DEVICES)
  compiled1, buckets1, matrices = _statistics_step(plan1, None, "fp32")
  compiled8, buckets8, _ = _statistics_step(plan8, _mesh(), "fp32")
  flops1 = dot_flops(compiled1.as_text())["every_call"]
  flops8 = dot_flops(compiled8.as_text())["every_call"]
  assert flops1 == _table_flops(plan1, 1)
  assert flops8 == _table_flops(plan8, NUM_DEVICES)
  assert flops8 <= 0.2 * flops1, flops8 / flops1

  new1, failures1, _ = jax.block_until_ready(compiled1(buckets1, matrices))
  new8, failures8, _ = jax.block_until_ready(compiled8(buckets8, matrices))
  assert int(failures1) == int(failures8) == 0
  counts = {key.name: len(slots) for key, slots in plan1.factor_slots().items()}
  for name, count in counts.items():
    want = np.asarray(fct.load(new1[name].stats))
    got = np.asarray(fct.load(new8[name].stats))[:count]
    np.testing.assert_allclose(got, want, rtol=0, atol=GRAM_RTOL * np.abs(want).max(), err_msg=name)


@pytest.mark.slow
def test_eigen_statistics_step_flops_per_device_at_most_a_fifth():
  """The 4-bit eigen format: Gram products and the QR refresh's products, both split by owner."""
  flops = {}
  for n in (1, NUM_DEVICES):
    compiled, _, _ = _statistics_step(_plan(SHAPES, n), _mesh() if n > 1 else None, "eigen")
    flops[n] = dot_flops(compiled.as_text())["every_call"]
  assert flops[NUM_DEVICES] <= 0.2 * flops[1], flops[NUM_DEVICES] / flops[1]
