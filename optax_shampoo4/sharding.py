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

The every-step preconditioning is split too: each device computes ``L̂ G R̂``
for its share of the blocks (:meth:`~optax_shampoo4.engine.FactorEngine.apply_blocks`).
A state saved on one mesh resumes on another with :func:`convert_state`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from optax_shampoo4 import factors as fct


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


def convert_state(state: Any, tx: Any, params: Any, shardings: Any = None) -> Any:
  """Converts an optimizer state to the factor layout of ``tx``: resume on another mesh.

  A transform built with ``mesh=`` pads every bucket's factor axis to a
  multiple of the mesh axis size, so states of the same optimizer on N and on
  M devices differ in those sizes (and nothing else). In every layout the
  real factors come first, in the plan's order; the padding factors after
  them are never used to precondition. This keeps the first
  ``min(k_old, k_new)`` factors of every bucket (all real ones, and possibly
  some old padding) and fills the remaining padding slots with fresh factors
  (statistic :math:`\\epsilon I`, root :math:`I`), so the converted state
  continues the trajectory exactly as the old one would. Works on any state
  of the library's optimizers, chained ones included (e.g. ``adamw_shampoo4``).

  To resume a checkpoint saved on N devices, restore it into its saved layout
  (``jax.eval_shape(tx_saved.init, params)``, where ``tx_saved`` is built with
  a mesh of N devices; on a host without them a
  ``jax.sharding.AbstractMesh((N,), ("data",))`` gives the same layout),
  then convert::

    state = convert_state(restored, tx, params,
                          s4.state_sharding(jax.eval_shape(tx.init, params), mesh))

  Args:
    state: an optimizer state of the same optimizer and parameter shapes, in
      any layout (jax or numpy arrays, e.g. restored from a checkpoint).
    tx: the transformation to continue with (built with the new ``mesh=``,
      or none for one device).
    params: the parameters, or their ``jax.ShapeDtypeStruct``.
    shardings: optional shardings of the result (e.g. from
      :func:`state_sharding`); default: the default device.

  Returns:
    The state in ``tx``'s layout.

  Raises:
    ValueError: if ``state`` is not a state of ``tx``'s optimizer for these
      parameter shapes (tree structure, bucket names or shapes differ).

  Example:
    >>> import jax, jax.numpy as jnp, optax_shampoo4 as s4
    >>> params = {"w": jnp.ones((96, 80))}
    >>> four = jax.sharding.AbstractMesh((4,), ("data",))
    >>> state4 = s4.adamw_shampoo4(1e-3, mesh=four).init(params)
    >>> state4[0].factors["order96_q"].eigvals.shape
    (4, 96)
    >>> state1 = s4.sharding.convert_state(state4, s4.adamw_shampoo4(1e-3), params)
    >>> state1[0].factors["order96_q"].eigvals.shape
    (1, 96)
  """
  target = jax.eval_shape(tx.init, params)
  if jax.tree.structure(state) != jax.tree.structure(target):
    raise ValueError(
        "state does not have the structure of tx.init(params) (another optimizer, other hyperparameters "
        f"or other parameters?):\n  state: {jax.tree.structure(state)}\n  tx:    {jax.tree.structure(target)}")

  def check(path, old, new, leading_may_differ):
    old_shape, new_shape = tuple(jax.numpy.shape(old)), tuple(new.shape)
    if (old_shape[1:] if leading_may_differ else old_shape) != (new_shape[1:] if leading_may_differ else new_shape):
      raise ValueError(f"state leaf {jax.tree_util.keystr(path)} has shape {old_shape}, but tx expects "
                       f"{new_shape}" + (" (up to the factor axis)" if leading_may_differ else ""))

  for path, node in jax.tree_util.tree_flatten_with_path(target, is_leaf=_is_bucket)[0]:
    old_node = _node_at(state, path)
    if _is_bucket(node):
      for (sub, new), old in zip(jax.tree_util.tree_flatten_with_path(node)[0], jax.tree.leaves(old_node)):
        check(path + sub, old, new, True)
    else:
      check(path, old_node, node, False)

  def convert(state):
    fresh = tx.init(jax.tree.map(lambda p: jax.numpy.zeros(jax.numpy.shape(p), p.dtype), params))

    def one(new, old, fresh_node):
      if not _is_bucket(new):
        return jax.numpy.asarray(old)

      def leaf(old, fresh):
        keep = min(old.shape[0], fresh.shape[0])
        return jax.numpy.concatenate([jax.numpy.asarray(old)[:keep], fresh[keep:]])

      return jax.tree.map(leaf, old, fresh_node)

    return jax.tree.map(one, target, state, fresh, is_leaf=_is_bucket)

  # Arrays on other devices than the result's (e.g. restored onto the old mesh) go through the host.
  if shardings is None:
    default = jax.config.jax_default_device
    if not isinstance(default, jax.Device):
      default = jax.devices(default)[0] if isinstance(default, str) else jax.devices()[0]
    devices = {default}
  else:
    devices = set(jax.tree.leaves(shardings)[0].device_set)

  def reachable(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) != devices:
      return np.asarray(x)
    return x

  return jax.jit(convert, out_shardings=shardings)(jax.tree.map(reachable, state))


def _node_at(tree: Any, path) -> Any:
  """The subtree of ``tree`` at a key path (of a tree with the same structure)."""
  node = tree
  for key in path:
    if isinstance(key, jax.tree_util.SequenceKey):
      node = node[key.idx]
    elif isinstance(key, jax.tree_util.DictKey):
      node = node[key.key]
    elif isinstance(key, jax.tree_util.GetAttrKey):
      node = getattr(node, key.name)
    else:  # pragma: no cover - other key kinds do not occur in optimizer states
      raise TypeError(f"unsupported key {key!r}")
  return node
