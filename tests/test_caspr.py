"""combine="caspr": J = L̂G + GR̂, Ĝ = L̂J + JR̂ per block, grafted, against a float64 numpy step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as s4


def _numpy_caspr(g, roots, plan_leaf):
  """float64 CASPR of every block of ``g`` from the state's roots, grafted to ‖G‖_F (per tensor)."""
  out = np.zeros_like(g)
  for b in plan_leaf.blocks:
    block = g[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
    left = roots[b.left.bucket.name][b.left.index]
    right = roots[b.right.bucket.name][b.right.index]
    j = left @ block + block @ right
    out[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = left @ j + j @ right
  return out * np.linalg.norm(g) / np.linalg.norm(out)


@pytest.mark.slow
@pytest.mark.parametrize("state_format", ["fp32", "naive", "eigen"])
def test_caspr_equals_numpy_reference(state_format):
  rng = np.random.default_rng(0)
  max_order, min_quant_order = 48, 16
  shape = (40, 100)  # blocks 40x48, 40x48, 40x4: three right factors, one left order
  tx = s4.scale_by_shampoo4(state_format=state_format, combine="caspr", stats_every=1, root_every=1,
                            max_order=max_order, min_quant_order=min_quant_order, epsilon=1e-3)
  params = {"w": jnp.zeros(shape)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(2):  # the second step uses roots built from the first two gradients
    g = rng.standard_normal(shape).astype(np.float32)
    updates, state = step({"w": jnp.asarray(g)}, state)
  roots = {name: np.asarray(s4.factors.load(bucket.root), np.float64) for name, bucket in state.factors.items()}
  plan = s4.partition.make_plan([shape], max_order, min_quant_order, state_format != "fp32")
  expected = _numpy_caspr(g.astype(np.float64), roots, plan.leaves[0])
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=2e-4, atol=2e-5)
  # ... and it differs from the plain Shampoo combination of the same roots.
  shampoo = np.zeros_like(expected)
  for b in plan.leaves[0].blocks:
    shampoo[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = (
        roots[b.left.bucket.name][b.left.index] @ g[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]]
        @ roots[b.right.bucket.name][b.right.index])
  shampoo *= np.linalg.norm(g) / np.linalg.norm(shampoo)
  assert np.linalg.norm(expected - shampoo) > 1e-3 * np.linalg.norm(shampoo)


def test_caspr_alias_and_validation():
  with pytest.raises(ValueError, match="combine"):
    s4.scale_by_shampoo4(combine="kron")
  opt = s4.adamw_shampoo4(1e-3, combine="caspr", stats_every=1, root_every=1)
  params = {"w": jnp.ones((8, 6)), "b": jnp.zeros(6)}
  state = opt.init(params)
  updates, _ = jax.jit(opt.update)({"w": jnp.arange(48.0).reshape(8, 6), "b": jnp.ones(6)}, state, params)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))
