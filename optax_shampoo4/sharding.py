"""Sharding the Shampoo factors over devices with ``jax.sharding``.

Every bucket stacks its factors along a leading axis that
:func:`~optax_shampoo4.scale_by_shampoo4` pads to a multiple of the mesh
axis size when given ``mesh=``. Sharding that axis gives each device ``1/N``
of the factors to store and to refresh (the refreshes run under
``jax.shard_map``, so every device runs QR / roots on its own share only),
and the roots are all-gathered, still quantized, for the per-step
preconditioning — the layout of Distributed Shampoo, expressed with XLA
collectives.

Typical use::

  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  tx = s4.adamw_shampoo4(1e-3, mesh=mesh)
  shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh)  # optax_shampoo4.state_utils
  opt_state = jax.jit(tx.init, out_shardings=shardings)(params)

The every-step preconditioning is split too: each device computes ``L̂ G R̂``
for its share of the blocks (:meth:`~optax_shampoo4.engine.FactorEngine.apply_blocks`).
A state saved on one mesh resumes on another with
:func:`~optax_shampoo4.state_utils.convert_state`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec


def validate_mesh(mesh: Any, mesh_axis: Any) -> int:
  """Checks ``mesh``/``mesh_axis``; returns the number of shards (1 if no mesh)."""
  if mesh is None:
    return 1
  if not isinstance(mesh, (Mesh, AbstractMesh)):
    raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got mesh={mesh!r}")
  if mesh_axis not in mesh.axis_names:
    raise ValueError(f"mesh_axis must name an axis of the mesh {mesh.axis_names}, "
                     f"got mesh_axis={mesh_axis!r}")
  return int(mesh.shape[mesh_axis])


def shard_over_factors(fn: Callable, mesh: Mesh | None, mesh_axis: str, num_sharded: int,
                       num_replicated: int) -> Callable:
  """Runs ``fn`` on each device's slice of the factor axis (identity if no mesh).

  ``fn`` takes ``num_sharded`` pytrees whose leaves have the factor axis first,
  then ``num_replicated`` replicated arguments, and returns pytrees with the
  factor axis first.
  """
  if mesh is None:
    return fn
  in_specs = (PartitionSpec(mesh_axis),) * num_sharded + (PartitionSpec(),) * num_replicated
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(mesh_axis),
                       check_vma=False)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Asks XLA to gather ``tree`` onto every device (identity if no mesh)."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


def split_factors(tree: Any, mesh: Mesh | None, mesh_axis: str) -> Any:
  """Asks XLA to keep ``tree``'s leaves split along their leading (factor) axis.

  Without it the returned roots would inherit the replicated layout of their
  all-gathered copies used for the preconditioning (identity if no mesh).
  """
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec(mesh_axis)))
