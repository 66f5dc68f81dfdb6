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
With FSDP (parameters and gradients split over a mesh axis, ``params_sharding``
of :func:`~optax_shampoo4.state_utils.state_sharding`) each block reaches the
device that owns it, and the results the parameters' layout, by all-to-alls
(:func:`laid_out_by_xla`): a device receives only the gradient blocks it works on,
never whole gradients.
A state saved on one mesh resumes on another with
:func:`~optax_shampoo4.state_utils.convert_state`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec


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


def layout_mesh(mesh: Mesh, *trees: Any) -> Mesh:
  """``mesh`` with the axis types of the arrays it will lay out (explicit or auto sharding).

  Under explicit sharding (the default axis type of ``jax.make_mesh``) an
  array's layout is part of its type, and ``shard_map`` / layout changes must
  name the mesh those types carry; elsewhere (``AxisType.Auto`` meshes,
  ``Mesh(np.array(devices))``, arrays on one device) the layouts are hints to
  XLA. The types are read from the context mesh (``jax.set_mesh``), else from
  the first array of ``trees`` that lives on a mesh with an explicit axis;
  with neither, every axis is taken as ``Auto``.

  Raises:
    ValueError: if those arrays live on a mesh whose axis names or sizes
      differ from ``mesh``'s (naming the axes).
  """
  found = [jax.sharding.get_abstract_mesh()]
  found += [jax.typeof(leaf).sharding.mesh for leaf in jax.tree.leaves(trees) if hasattr(leaf, "dtype")]
  for typed in found:
    if typed.empty or not any(t == AxisType.Explicit for t in typed.axis_types):
      continue
    if tuple(typed.axis_names) != tuple(mesh.axis_names) or tuple(typed.axis_sizes) != tuple(mesh.axis_sizes):
      raise ValueError(
          f"the arrays live on a mesh with axes {dict(zip(typed.axis_names, typed.axis_sizes))}, but the "
          f"optimizer was built with mesh= of axes {dict(zip(mesh.axis_names, mesh.axis_sizes))}; "
          "build it with the mesh the arrays are on")
    types = tuple(typed.axis_types)
    break
  else:
    types = (AxisType.Auto,) * len(mesh.axis_names)
  if tuple(getattr(mesh, "axis_types", ())) == types:
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=types)


def is_explicit(mesh: Mesh) -> bool:
  """Whether any axis of ``mesh`` has explicit sharding (layouts are part of array types)."""
  return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def constrain(tree: Any, mesh: Mesh, spec: PartitionSpec) -> Any:
  """Lays every leaf of ``tree`` out as ``spec`` on ``mesh`` (a :func:`layout_mesh`).

  Explicit axes are resharded (``jax.sharding.reshard``, the layout becomes
  the leaves' type); auto axes get ``with_sharding_constraint``.
  """
  types = dict(zip(mesh.axis_names, mesh.axis_types))

  def keep(kind):
    def on_axes(entry):
      names = entry if isinstance(entry, tuple) else (entry,)
      kept = tuple(n for n in names if n is not None and types[n] == kind)
      return kept if isinstance(entry, tuple) else (kept[0] if kept else None)
    return PartitionSpec(*(on_axes(entry) for entry in spec))

  if is_explicit(mesh):
    tree = jax.sharding.reshard(tree, NamedSharding(mesh, keep(AxisType.Explicit)))
  if any(t == AxisType.Auto for t in mesh.axis_types):
    tree = jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, keep(AxisType.Auto)))
  return tree


def like(tree: Any, reference: Any, mesh: Mesh) -> Any:
  """Explicit sharding: ``tree``'s leaves resharded to the types of ``reference``'s (same structure).

  So that, e.g., both branches of a ``lax.cond`` return the same types.
  Identity on auto meshes.
  """
  if not is_explicit(mesh):
    return tree
  return jax.tree.map(lambda x, ref: jax.sharding.reshard(x, NamedSharding(mesh, jax.typeof(ref).sharding.spec)),
                      tree, reference)


def shard_over_factors(fn: Callable, mesh: Mesh | None, mesh_axis: str, num_sharded: int,
                       num_replicated: int) -> Callable:
  """Runs ``fn`` on each device's slice of the factor axis (identity if no mesh).

  ``fn`` takes ``num_sharded`` pytrees whose leaves have the factor axis first,
  then ``num_replicated`` replicated arguments, and returns pytrees with the
  factor axis first. Works on auto and explicit meshes: under explicit
  sharding the operands are resharded to the layout ``shard_map`` needs, and
  the first result gets the types of the first operand when it has its tree
  structure (e.g. a refreshed bucket), the others are replicated.
  """
  if mesh is None:
    return fn

  def run(*args):
    layout = layout_mesh(mesh, args)
    in_specs = (PartitionSpec(mesh_axis),) * num_sharded + (PartitionSpec(),) * num_replicated
    if is_explicit(layout):
      args = tuple(arg if arg is None else constrain(arg, layout, spec) for arg, spec in zip(args, in_specs))
    out = jax.shard_map(fn, mesh=layout, in_specs=in_specs, out_specs=PartitionSpec(mesh_axis),
                        check_vma=False)(*args)
    if not is_explicit(layout):
      return out
    parts = list(out) if isinstance(out, tuple) else [out]
    first = parts[0]
    if jax.tree.structure(first) == jax.tree.structure(args[0]):
      parts[0] = like(first, args[0], layout)
    else:
      parts[0] = constrain(first, layout, PartitionSpec())
    parts[1:] = [constrain(part, layout, PartitionSpec()) for part in parts[1:]]
    return tuple(parts) if isinstance(out, tuple) else parts[0]

  return run


def laid_out_by_xla(fn: Callable, mesh: Mesh | None, out_specs: Any, *args: Any) -> Any:
  """``fn(*args)``, its results laid out as ``out_specs`` (a pytree of ``PartitionSpec``, or one for all).

  ``fn`` is a layout change written as plain array code (slices, stacks,
  concatenations, e.g. gradient blocks moved to the devices that own them):
  XLA chooses the collectives, which it does from the arrays' actual layouts
  (an all-to-all where a split array changes its split axis, a local slice
  where it was replicated). On auto meshes this is plain ``fn``: the layouts
  come from the consumers (``shard_map``'s ``in_specs``, the caller's
  ``out_shardings``). Under explicit sharding ``fn`` runs with the mesh's
  axes made auto (``jax.sharding.auto_axes``), so that its intermediate
  layouts are XLA's choice rather than types that must divide evenly, and
  its results get the types ``out_specs``.
  """
  layout = None if mesh is None else layout_mesh(mesh, args)
  if layout is None or not is_explicit(layout):
    return fn(*args)
  if isinstance(out_specs, PartitionSpec):
    out_shardings = NamedSharding(layout, out_specs)
  else:
    out_shardings = jax.tree.map(lambda spec: NamedSharding(layout, spec), out_specs,
                                 is_leaf=lambda x: isinstance(x, PartitionSpec))
  with jax.sharding.use_abstract_mesh(layout.abstract_mesh):
    return jax.sharding.auto_axes(fn, out_sharding=out_shardings)(*args)


def hint(x: jax.Array, mesh: Mesh, spec: PartitionSpec | None) -> jax.Array:
  """``x`` laid out as ``spec`` on ``mesh``'s devices, as a hint to XLA (identity for ``spec=None``).

  For the inside of :func:`laid_out_by_xla` (or an auto mesh): the
  constraint names the mesh with every axis auto.
  """
  if spec is None:
    return x
  auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
  return jax.lax.with_sharding_constraint(x, NamedSharding(auto, spec))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Asks XLA to gather ``tree`` onto every device (identity if no mesh)."""
  if mesh is None:
    return tree
  return constrain(tree, layout_mesh(mesh, tree), PartitionSpec())


def replicate_if_explicit(tree: Any, mesh: Mesh | None) -> Any:
  """Explicit sharding: ``tree`` replicated (so any op may consume it); otherwise unchanged.

  On auto meshes XLA chooses the layouts of intermediate results itself.
  """
  if mesh is None:
    return tree
  layout = layout_mesh(mesh, tree)
  return constrain(tree, layout, PartitionSpec()) if is_explicit(layout) else tree


def split_factors(tree: Any, mesh: Mesh | None, mesh_axis: str) -> Any:
  """Asks XLA to keep ``tree``'s leaves split along their leading (factor) axis.

  Without it the returned roots would inherit the replicated layout of their
  all-gathered copies used for the preconditioning (identity if no mesh).
  """
  if mesh is None:
    return tree
  return constrain(tree, layout_mesh(mesh, tree), PartitionSpec(mesh_axis))


def moment_sharding(param_sharding: Any, shape: tuple[int, ...]) -> Any:
  """The sharding of a state leaf of ``shape`` that mirrors a parameter laid out as ``param_sharding``.

  Float32 moments have the parameter's shape and take its sharding.
  Quantized moments (``moment_bits=8|4``) are blocked and packed along the
  last axis only: their codes and block scales keep the parameter's leading
  axes, so they take the parameter's layout of those axes (and of the last
  one where it divides evenly). None for scalars (a small tensor's
  placeholder scale) and where the layout does not divide the shape.
  """
  if not shape:
    return None
  if isinstance(param_sharding, NamedSharding):
    spec = tuple(param_sharding.spec)[:len(shape)]
    param_sharding = NamedSharding(param_sharding.mesh, PartitionSpec(*spec))
  try:
    param_sharding.shard_shape(tuple(shape))
  except (ValueError, IndexError):
    return None
  return param_sharding


def spec_of(x: Any) -> Any:
  """The ``PartitionSpec`` of ``x``'s type (explicit sharding), replicated where it has none; None for None."""
  if x is None:
    return None
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return PartitionSpec() if spec is None else spec


def explicit_layout(x: Any) -> NamedSharding | None:
  """The layout of ``x`` if it is split over an axis of explicit sharding (part of its type), else None."""
  layout = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(layout, "mesh", None)
  if mesh is None or not any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    return None
  spec = getattr(layout, "spec", ())
  return layout if any(entry is not None for entry in spec) else None


def reshape(x: jax.Array, shape: tuple[int, ...], like: jax.Array | None = None) -> jax.Array:
  """``x.reshape(shape)`` under any layout (a parameter's matrix view, and back), laid out like ``like`` if given.

  Under explicit sharding JAX asks for the result's layout where a split
  dimension is merged with others or split itself: a split dimension that the
  result keeps (the same size at the same offset) stays split, the others are
  gathered (XLA moves them); ``like`` (e.g. the parameter) then gives the
  result its layout. Elsewhere this is ``x.reshape(shape)``.
  """
  layout = explicit_layout(x)
  shape = tuple(shape)
  if layout is None or tuple(x.shape) == shape:
    out = x.reshape(shape)
  else:
    entries = tuple(layout.spec) + (None,) * (x.ndim - len(layout.spec))
    kept = {(math.prod(x.shape[:d]), size): entry for d, (size, entry) in enumerate(zip(x.shape, entries))}
    spec = PartitionSpec(*(kept.get((math.prod(shape[:d]), size)) for d, size in enumerate(shape)))
    out = jax.lax.reshape(x, shape, out_sharding=NamedSharding(layout.mesh, spec))
  return out if like is None else laid_out_like(out, like)


def unsplit(x: jax.Array) -> jax.Array:
  """``x`` replicated if it is split over an explicit axis; otherwise unchanged."""
  layout = explicit_layout(x)
  return x if layout is None else jax.sharding.reshard(x, NamedSharding(layout.mesh, PartitionSpec()))


def laid_out_like(x: jax.Array, reference: jax.Array) -> jax.Array:
  """Explicit sharding: ``x`` resharded to ``reference``'s layout where they differ; otherwise unchanged."""
  want = jax.typeof(reference).sharding
  if explicit_layout(x) is None and explicit_layout(reference) is None:
    return x
  if jax.typeof(x).sharding.spec == want.spec:
    return x
  return jax.sharding.reshard(x, NamedSharding(want.mesh, want.spec))


def table_lookup(table: Any, indices: jax.Array, mode: str | None = None) -> jax.Array:
  """``table[indices]`` for a small 1-D table (a codebook), laid out like ``indices``.

  Under explicit sharding (indices split over an explicit mesh axis) the
  gather is given its output layout, the indices' one (the table is
  replicated); elsewhere this is ``jnp.take(table, indices, mode=mode)``.
  """
  layout = explicit_layout(indices)
  if layout is None:
    return jnp.take(table, indices, mode=mode)
  return jnp.asarray(table).at[indices].get(mode=mode, out_sharding=layout)
