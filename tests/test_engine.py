"""Tests of the shared engine pieces: step prologue, placeholder init, failure counters, apply_blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import engine, optax_compat, options, partition

SHAPES = {"w": (24, 40), "v": (40, 12), "b": (7,)}


def _engine(mesh=None, max_precond_dim=None):
  opts = options.SoapOptions.from_kwargs(state_format="fp32", max_order=16, mesh=mesh)
  return engine.FactorEngine(opts.factor_config(), opts.max_order, opts.quantized_from, mesh, "data",
                             max_precond_dim)


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def test_start_step_counts_plans_and_checks_finiteness():
  eng = _engine()
  tree = _tree()
  step = eng.start_step(tree, jnp.asarray(4, jnp.int32), None)
  assert int(step.count) == 5 and bool(step.grads_finite)
  assert [None if m is None else m.shape for m in step.matrices] == [
      lp.matrix_shape if lp.preconditioned else None for lp in step.plan.leaves]
  assert step.treedef == jax.tree.structure(tree) and len(step.leaves) == 3
  saturated = eng.start_step(tree, jnp.asarray(np.iinfo(np.int32).max, jnp.int32), None)
  assert int(saturated.count) == np.iinfo(np.int32).max  # optax.safe_increment
  tree["b"] = tree["b"].at[3].set(jnp.inf)
  assert not bool(eng.start_step(tree, jnp.zeros([], jnp.int32), None).grads_finite)


@pytest.mark.parametrize("factory", [s4.scale_by_shampoo4, s4.scale_by_soap4])
def test_updates_of_other_shapes_than_the_state_are_named(factory):
  tx = factory(max_order=16)
  state = tx.init(_tree())
  other = dict(_tree(), w=jnp.ones((24, 41)))  # one more column: another block of another order
  with pytest.raises(ValueError, match="updates do not match the optimizer state"):
    jax.jit(tx.update)(other, state)
  eng = _engine()
  engine.check_buckets_match(eng.plan(_tree()), eng.init_buckets(eng.plan(_tree()), jnp.float32(0.0)))  # matches


@pytest.mark.parametrize("finite, due, failures, want", [
    (True, True, 2, (0, 0, 2)), (False, True, 0, (1, 1, 0)), (False, False, 0, (1, 0, 0)), (True, False, 0, (0, 0, 0)),
])
def test_failure_counts(finite, due, failures, want):
  class State:
    nonfinite_steps = jnp.asarray(3, jnp.int32)
    skipped_stats = jnp.asarray(1, jnp.int32)
    failed_refreshes = jnp.asarray(5, jnp.int32)

  got = engine.failure_counts(State, jnp.asarray(finite), jnp.asarray(due), jnp.asarray(failures, jnp.int32))
  assert {k: int(v) for k, v in got.items()} == {
      "nonfinite_steps": 3 + want[0], "skipped_stats": 1 + want[1], "failed_refreshes": 5 + want[2]}


def test_init_factors_placeholder_and_dtypes():
  eng = _engine()
  buckets = eng.init_factors(_tree(), 0.5, "owner")
  plan = eng.plan(_tree())
  assert sorted(buckets) == sorted(key.name for key in plan.buckets)
  placeholder_state = optax.tree.map_params(
      optax.GradientTransformation(lambda p: {"f": eng.init_factors(p, 0.5, "owner")}, None),
      lambda x: x, {"f": buckets})
  assert placeholder_state["f"] is buckets  # the non-parameter leaf is left alone
  with pytest.raises(TypeError, match=r"owner.*\['n'\]"):
    eng.init_factors({"n": jnp.zeros((4, 4), jnp.int32)}, 0.5, "owner")


def test_init_factors_returns_the_opaque_leaf_for_the_placeholder():
  seen = {}

  def init(params):
    seen["f"] = _engine().init_factors(params, 0.5, "owner")
    return seen["f"]

  optax.tree.map_params(optax.GradientTransformation(init, None), lambda x: x, _engine().init_factors(
      _tree(), 0.5, "owner"))
  assert seen["f"] is optax_compat.NON_PARAMS


def _reference(plan, matrices, stored, fn64):
  """Per leaf, fn64(whole left, block, whole right) of every block, in float64."""
  out = []
  for m, lp in zip(matrices, plan.leaves):
    if not lp.preconditioned:
      out.append(None)
      continue
    result = np.zeros(lp.matrix_shape)
    for b in lp.blocks:
      left = None if b.left is None else stored[b.left.bucket.name][b.left.index].astype(np.float64)
      right = None if b.right is None else stored[b.right.bucket.name][b.right.index].astype(np.float64)
      block = np.asarray(m, np.float64)[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
      result[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = fn64(left, block, right)
    out.append(result)
  return out


def _sides(left, block, right, xp):
  """``left @ block @ rightᵀ`` with None sides the identity (SOAP's forward rotation)."""
  if left is not None:
    block = left @ block
  if right is not None:
    block = block @ xp.swapaxes(right, -1, -2)
  return block


def _whole_left(left, block, right, xp):
  """``left @ left @ block``: needs the whole left factor (as CASPR's L̂²G)."""
  return left @ (left @ block) if left is not None else block


def _doubled(stored):
  """A ``load`` that needs whole matrices (each device decodes its items' factors whole)."""
  return 2.0 * stored


@pytest.mark.parametrize("fn, split_rows, load", [(_sides, True, None), (_whole_left, False, None),
                                                  (_sides, True, _doubled), (_whole_left, False, _doubled)])
@pytest.mark.parametrize("devices", [None, 8])
def test_apply_blocks_matches_float64_with_missing_sides(fn, split_rows, load, devices):
  mesh = None if devices is None else jax.make_mesh((devices,), ("data",),
                                                    axis_types=(jax.sharding.AxisType.Explicit,))
  eng = _engine(mesh, max_precond_dim=30)  # the 40-dimensions get no factor
  tree = _tree()
  plan = eng.plan(tree)
  assert any(b.left is None or b.right is None for lp in plan.leaves for b in lp.blocks)
  rng = np.random.default_rng(1)
  stored = {key.name: rng.standard_normal((size, key.order, key.order)).astype(np.float32) / np.sqrt(key.order)
            for key, size in plan.bucket_sizes}
  matrices = engine.matrix_views(jax.tree.leaves(tree), plan)
  got = jax.jit(lambda s, m: eng.apply_blocks(plan, m, s, lambda a, g, c: fn(a, g, c, jnp),
                                              split_rows=split_rows, load=load))(stored, matrices)
  loaded = stored if load is None else {name: load(matrix) for name, matrix in stored.items()}
  want = _reference(plan, matrices, loaded, lambda a, g, c: fn(a, g, c, np))
  for g, w in zip(got, want):
    if w is None:
      assert g is None
    else:
      # float32 products of unit-scale factors of order <= 16: errors ~ 16 * 6e-8 * |terms| << 1e-4.
      np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)


def test_schedule_without_row_splits_keeps_blocks_whole():
  plan = partition.make_plan([(256, 64)], 1024, 64, True)
  assert partition.make_schedule(plan, 4).groups[0].chunks == 4
  assert partition.make_schedule(plan, 4, split_rows=False).groups[0].chunks == 1


def test_blocks_without_a_left_factor_are_cut_into_row_chunks_for_any_product():
  """Their rows of the result need only their rows of the gradient, whatever the product needs of a left factor."""
  plan = partition.make_plan([(256, 64)], 1024, 64, True, max_precond_dim=128)  # 256 rows: no left factor
  assert plan.leaves[0].blocks[0].left is None
  assert partition.make_schedule(plan, 4, split_rows=False).groups[0].chunks == 4
