"""On a mesh, every collective of a step is ordered with the refreshes (:meth:`FactorEngine.ordered_after`).

A refresh is a ``lax.cond`` whose taken branch holds collectives. XLA:CPU
may run such a conditional concurrently with collectives that neither feed
it nor depend on it; then devices reach the collectives in different orders,
and with as many pool threads as CPU devices (8 devices on 2 cores) every
thread can end up waiting in a different one: a deadlock XLA aborts after 40 s.
Seen here (``tests/integration/test_properties.py``'s fuzz,
``distributed_shampoo4`` on three leaves) in 5 of 20 three-step runs before
the gate, none of 32 after. A deadlock's timing cannot be tested reliably, so this checks its
cause in the compiled program: in the top-level computation every collective
is an ancestor or a descendant of each conditional that holds collectives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_collectives import unordered_collectives

import optax_shampoo4 as s4


def _compiled_update(tx, params, mesh):
  """The update's compiled program, its state laid out as the library's own users lay it out."""
  shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  return jax.jit(tx.update, out_shardings=(None, shardings)).lower(params, state, params).compile().as_text()


MESH = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
PARAMS = {"w": jnp.ones((11, 5), jnp.bfloat16), "b": jnp.ones((17,), jnp.float16), "c": jnp.ones((7,), jnp.float16)}


def test_the_check_finds_an_unordered_collective():
  """A conditional with a collective beside an independent all-reduce: reported."""
  sharding = jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec("data"))

  def step(flag, x, y):
    inside = jax.lax.cond(flag, lambda v: jnp.sum(v) * jnp.ones(8), lambda v: v, x)
    return inside, jnp.sum(y)

  x = jax.device_put(jnp.arange(8.0), sharding)
  hlo = jax.jit(step).lower(True, x, x + 1).compile().as_text()
  assert unordered_collectives(hlo)


EXPLICIT = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
CONFIGS = {
    "distributed_shampoo4": lambda mesh: s4.distributed_shampoo4(
        epsilon=1e-3, root_every=3, bits=8, refresh_method="adaptive", refresh_tol=0.1, store_root=False,
        moment_bits=8, mesh=mesh),
    "adamw_shampoo4": lambda mesh: s4.adamw_shampoo4(1e-3, stats_every=2, root_every=2, mesh=mesh),
    "soap4": lambda mesh: s4.soap4(1e-3, precondition_every=2, mesh=mesh),
}


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_collective_is_ordered_with_the_refreshes(name, explicit):
  mesh = EXPLICIT if explicit else MESH
  params = PARAMS
  if explicit:
    params = jax.device_put(PARAMS, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  with jax.set_mesh(mesh):
    assert unordered_collectives(_compiled_update(CONFIGS[name](mesh), params, mesh)) == []
