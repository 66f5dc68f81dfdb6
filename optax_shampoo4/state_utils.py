r"""Utilities on optimizer states: placement on a mesh, conversion between layouts, bytes.

* :func:`state_sharding`: a :class:`jax.sharding.NamedSharding` per state
  leaf (factor buckets split along their factor axis, the rest replicated or
  sharded like the parameters they mirror);
* :func:`convert_state`: a state saved on one mesh in the layout of another;
* :func:`state_nbytes`: the bytes of a state by part, without allocating it.

They work on any state of the library (chained ones included) by its
structure: factor buckets are :class:`~optax_shampoo4.factor_state.EigenFactors` /
:class:`~optax_shampoo4.factor_state.MatrixFactors` nodes, and quantized moments
are the field pairs ``(name, name + "_scales")`` of a state NamedTuple
(:func:`quantized_fields`), so no optimizer module is imported here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_shampoo4 import factors as fct
from optax_shampoo4 import moment_storage
from optax_shampoo4 import quantization as qz
from optax_shampoo4.sharding import moment_sharding, validate_mesh

SCALES_SUFFIX = "_scales"


def quantized_fields(node: Any) -> tuple[tuple[str, str], ...]:
  """The ``(codes field, scales field)`` pairs of a state NamedTuple (empty for anything else).

  A state stores a quantized moment tree ``name`` beside its scales
  ``name + "_scales"`` (e.g. ``mu`` / ``mu_scales``); where the moment is
  kept in float32 the scales field is None.

  Example:
    >>> import optax_shampoo4 as s4
    >>> s4.state_utils.quantized_fields(s4.ScaleBySoap4State(*[None] * 7))
    (('mu', 'mu_scales'), ('nu', 'nu_scales'))
  """
  fields = getattr(type(node), "_fields", None)
  if not isinstance(node, tuple) or fields is None:
    return ()
  return tuple((name, name + SCALES_SUFFIX) for name in fields if name + SCALES_SUFFIX in fields)


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
        mirrored = moment_sharding(sharding, leaf.shape)
        if mirrored is not None:
          return mirrored
    return replicated

  def assign(path, node):
    if _is_bucket(node):
      return jax.tree.map(for_factor_leaf, node)
    return for_other_leaf(path, node)

  return jax.tree_util.tree_map_with_path(assign, abstract_state, is_leaf=_is_bucket)


def convert_state(state: Any, tx: Any, params: Any, shardings: Any = None) -> Any:
  r"""Converts an optimizer state to the factor layout of ``tx``: resume on another mesh.

  A transform built with ``mesh=`` pads every bucket's factor axis to a
  multiple of the mesh axis size, so states of the same optimizer on N and on
  M devices differ in those sizes (and nothing else). In every layout the
  real factors come first, in the plan's order; the padding factors after
  them are never used to precondition. This keeps the first
  ``min(k_old, k_new)`` factors of every bucket (all real ones, and possibly
  some old padding) and fills the remaining padding slots with fresh factors
  (statistic :math:`\epsilon I`, root :math:`I`), so the converted state
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
    >>> state1 = s4.convert_state(state4, s4.adamw_shampoo4(1e-3), params)
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
    default = jax.config.jax_default_device  # pyright: ignore[reportAttributeAccessIssue]  (a dynamic attribute)
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


PARTS = (
    "quantized_codes",  # packed uint8 codes of quantized matrices
    "quantized_scales",  # float32 absmax scales of those codes
    "eigenvalues",  # float32 eigenvalues ("eigen" format)
    "diagonals",  # float32 diagonals kept beside quantized off-diagonals
    "dense_factors",  # float32 factor matrices (fp32 format, small orders)
    "first_order",  # other array leaves outside Shampoo factors (float32 Adam moments, momentum, ...)
    "other",  # scalars: step counts, failure counters
    "moment_codes",  # uint8 codes of quantized first-order moments (optax_shampoo4.moments)
    "moment_scales",  # float32 scales of those codes (block absmax or rank-1 maxima)
)


def _nbytes(leaf: Any) -> int:
  return int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def state_nbytes(state: Any) -> dict[str, int]:
  """Bytes of each part of an optimizer state, and their ``"total"``.

  Works on concrete states and on ``jax.eval_shape`` output alike, so the
  state of a large model is measured without allocating it. Also reports
  ``"preconditioner"``: the sum of the Shampoo factor parts.

  Args:
    state: any optimizer state (e.g. of an ``optax.chain``) that may contain
      the library's states (Shampoo's and SOAP's factors, quantized moments).

  Returns:
    ``{part: bytes}`` for every part in :data:`PARTS`, plus
    ``"preconditioner"`` and ``"total"``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_shampoo4 as s4
    >>> tx = s4.scale_by_shampoo4()
    >>> shapes = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((512, 512), jnp.float32)})
    >>> s4.state_nbytes(shapes)["quantized_codes"]  # 2 factors x 2 matrices x 512*256 bytes
    524288
  """
  parts: dict[str, int] = dict.fromkeys(PARTS, 0)

  def add_codes(node: Any, kind: str) -> None:  # a QuantizedArray or a QuantizedMoment
    parts[f"{kind}_codes"] += _nbytes(node.codes)
    parts[f"{kind}_scales"] += _nbytes(node.scales)

  def add_stored(stored: Any) -> None:
    if stored is None:  # a part this format does not keep (SOAP's root, Jorge's statistic)
      return
    if isinstance(stored, qz.OffDiagQuantized):
      parts["diagonals"] += _nbytes(stored.diag)
      add_stored(stored.offdiag)
    elif isinstance(stored, qz.SplitRowsQuantized):
      add_stored(stored.head)
      add_stored(stored.tail)
    elif isinstance(stored, qz.QuantizedArray):
      add_codes(stored, "quantized")
    else:
      parts["dense_factors"] += _nbytes(stored)

  def is_bucket(node: Any) -> bool:
    return isinstance(node, (fct.EigenFactors, fct.MatrixFactors, moment_storage.QuantizedMoment)) or bool(
        quantized_fields(node))

  def count(tree: Any) -> None:
    for node in jax.tree.leaves(tree, is_leaf=is_bucket):
      if isinstance(node, fct.EigenFactors):
        add_stored(node.eigvecs)
        parts["eigenvalues"] += _nbytes(node.eigvals)
        if node.root_eigvals is not None:  # store_root="eigvals": the roots' eigenvalues
          parts["eigenvalues"] += _nbytes(node.root_eigvals)
        add_stored(node.root)
      elif isinstance(node, fct.MatrixFactors):
        add_stored(node.stats)
        add_stored(node.root)
      elif isinstance(node, moment_storage.QuantizedMoment):
        add_codes(node, "moment")
      elif quantized_fields(node):
        stored = [name for pair in quantized_fields(node) for name in pair]
        for name, tree in zip(node._fields, node):
          if name not in stored:
            count(tree)  # counters, factor buckets
            continue
          for leaf in jax.tree.leaves(tree):
            if np.ndim(leaf) == 0:
              parts["other"] += _nbytes(leaf)  # a small tensor's placeholder scale
            elif name.endswith("_scales"):
              parts["moment_scales"] += _nbytes(leaf)
            elif leaf.dtype == np.uint8:
              parts["moment_codes"] += _nbytes(leaf)
            else:  # a float32 moment (a small tensor's, or all of them without moment_bits)
              parts["first_order"] += _nbytes(leaf)
      elif np.ndim(node) >= 1:
        parts["first_order"] += _nbytes(node)
      else:
        parts["other"] += _nbytes(node)

  count(state)
  parts["preconditioner"] = sum(parts[p] for p in PARTS[:5])
  parts["total"] = sum(parts[p] for p in PARTS)
  return parts
