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
  shardings = s4.state_sharding(jax.eval_shape(tx.init, params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_shampoo4 import factors as fct


def validate_mesh(mesh: Any, mesh_axis: Any) -> int:
  """Checks ``mesh``/``mesh_axis``; returns the number of shards (1 if no mesh)."""
  if mesh is None:
    return 1
  if not isinstance(mesh, Mesh):
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


def _is_bucket(node: Any) -> bool:
  return isinstance(node, (fct.EigenFactors, fct.MatrixFactors))


def _path_keys(path) -> tuple:
  return tuple(str(k) for k in path)


def state_sharding(abstract_state: Any, mesh: Mesh, axis: str = "data",
                   params_sharding: Any = None) -> Any:
  """A pytree of :class:`jax.sharding.NamedSharding` for an optimizer state.

  Shampoo factor leaves are split along their leading (factor) axis over
  ``axis``; everything else is replicated, except leaves that mirror a
  parameter (Adam's moments, momentum) when ``params_sharding`` is given:
  those take the sharding of the parameter whose tree path ends theirs and
  whose shape they share (FSDP-style states).

  Args:
    abstract_state: the state or its ``jax.eval_shape(tx.init, params)``.
    mesh: the device mesh.
    axis: the mesh axis that splits the factors; the transform must have been
      built with ``mesh=mesh, mesh_axis=axis`` so that every bucket's factor
      axis is a multiple of its size.
    params_sharding: optional pytree of shardings of the parameters.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``abstract_state``,
    for ``jax.jit(..., out_shardings=...)`` or ``jax.device_put``.

  Raises:
    ValueError: if a factor axis is not a multiple of the mesh axis size.
  """
  num_shards = validate_mesh(mesh, axis)
  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec(axis))

  param_entries = []
  if params_sharding is not None:
    for path, sharding in jax.tree_util.tree_flatten_with_path(params_sharding)[0]:
      param_entries.append((_path_keys(path), sharding))

  def for_factor_leaf(leaf):
    if leaf.shape[0] % num_shards:
      raise ValueError(
          f"a factor bucket of {leaf.shape[0]} factors cannot be split over {num_shards} devices; "
          f"build the transform with mesh=<this mesh>, mesh_axis={axis!r} so buckets are padded")
    return split

  def for_other_leaf(path, leaf):
    keys = _path_keys(path)
    for param_keys, sharding in param_entries:
      if param_keys and keys[-len(param_keys):] == param_keys and hasattr(sharding, "shard_shape"):
        try:
          sharding.shard_shape(leaf.shape)
        except ValueError:
          continue
        return sharding
    return replicated

  def assign(path, node):
    if _is_bucket(node):
      return jax.tree.map(for_factor_leaf, node)
    return for_other_leaf(path, node)

  return jax.tree_util.tree_map_with_path(assign, abstract_state, is_leaf=_is_bucket)
