r"""Moving gradient blocks to the devices that work on them, and the results back.

With a mesh, the per-block work of :class:`~optax_shampoo4.engine.FactorEngine`
is split over the devices: a statistics step's Gram matrices by the factors'
owners (:mod:`~optax_shampoo4.owned_grams`), the every-step products by the
items of a :class:`~optax_shampoo4.partition.Schedule`. Each device needs the
blocks of its own work only. They are written here as plain array code —
slices of the matrix views, stacked in the order of the devices' shares
(:func:`item_blocks`), and the inverse (:func:`reassemble`) — which the engine
runs under :func:`~optax_shampoo4.sharding.laid_out_by_xla`, so that XLA moves
each block from wherever the gradient lives: a local slice of replicated
gradients, all-to-alls of gradients split like FSDP parameters. No device
gathers a whole gradient (``tests/integration/test_fsdp.py`` reads the
compiled programs).

Where a parameter's shards do not line up with its blocks (GPT-2's
``(768, 2304)`` kernel split over 8 devices in columns of 288, blocks of 1024
columns), XLA would gather whole stacks of blocks to slice them;
:class:`BlockLayout` first lays each view out where its blocks divide evenly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from optax_shampoo4 import partition, sharding

FREE = PartitionSpec.UNCONSTRAINED  # a dimension of a layout hint that XLA may lay out as it finds it


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Layouts that keep the moves of gradient blocks aligned with the blocks (all-to-alls, not gathers).

  A matrix view split over the devices along a dimension that the blocks
  cut (a parameter split like FSDP, its shards' bounds not those of the
  blocks) would make XLA gather whole stacks of blocks to slice them. So a
  view is first split where every block takes an even share: along its rows
  if it has one row of blocks, else along its columns if it has one column
  of blocks (:meth:`view_spec`; one all-to-all from the parameter's
  layout), and each block along its own rows or columns (:meth:`for_blocks`).
  Only the factor axis is named: the other mesh axes (a ``data × model``
  mesh's ``model``) stay where XLA finds them (``FREE``). The hints name
  ``mesh``'s devices with auto axes (:func:`~optax_shampoo4.sharding.hint`),
  for the inside of :func:`~optax_shampoo4.sharding.laid_out_by_xla`.
  """

  mesh: jax.sharding.Mesh
  axis: str
  plan: partition.Plan

  def view_spec(self, leaf_plan: partition.LeafPlan) -> PartitionSpec | None:
    """The split of a leaf's matrix view that cuts each of its blocks evenly (None: none does)."""
    if len({b.rows for b in leaf_plan.blocks}) == 1:
      return PartitionSpec(self.axis, FREE)
    if len({b.cols for b in leaf_plan.blocks}) == 1:
      return PartitionSpec(FREE, self.axis)
    return None

  def aligned_views(self, matrices: list) -> list:
    """The matrix views (None for passthrough leaves) split as :meth:`view_spec` says."""
    return [None if m is None else sharding.hint(m, self.mesh, self.view_spec(lp))
            for m, lp in zip(matrices, self.plan.leaves)]

  def for_blocks(self, shape: tuple[int, ...]) -> Callable[[jax.Array], jax.Array]:
    """``block -> block`` split along its rows (else its columns) where they divide over the devices."""
    size = self.mesh.shape[self.axis]
    spec = (PartitionSpec(self.axis, FREE) if shape[0] % size == 0 else
            PartitionSpec(FREE, self.axis) if shape[1] % size == 0 else None)
    return lambda block: sharding.hint(block, self.mesh, spec)


def reassemble(schedule: partition.Schedule, plan: partition.Plan, results: list[jax.Array],
               layout: BlockLayout | None = None) -> list:
  """Per leaf, its matrix view put together from the per-item ``results`` of ``schedule`` (None: passthrough).

  With ``layout``, each group's results are first split along their columns
  (an all-to-all from the split over items), so that merging a block's row
  chunks moves nothing, and each block then takes its view's split.
  """
  blocks = {}
  for group, result in zip(schedule.groups, results):  # [num_shards * per_shard, rows, n]
    m, n = group.shape
    if layout is not None and n % layout.mesh.shape[layout.axis] == 0:
      result = sharding.hint(result, layout.mesh, PartitionSpec(FREE, FREE, layout.axis))
    whole = result[:len(group.blocks) * group.chunks].reshape(len(group.blocks), group.chunks * group.rows, n)
    for position, (leaf, block) in enumerate(group.blocks):
      spec = None if layout is None else layout.view_spec(plan.leaves[leaf])
      blocks[block] = whole[position, :m] if layout is None else sharding.hint(whole[position, :m], layout.mesh,
                                                                                spec)
  views = [join_blocks(lp, blocks.__getitem__) if lp.preconditioned else None for lp in plan.leaves]
  return views if layout is None else layout.aligned_views(views)


def item_blocks(group: partition.BlockGroup, matrices: list, num_shards: int,
                layout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """The block of every item of ``group``, in item order: ``f32[num_shards · per_shard, m, n]``.

  Split over ``num_shards`` devices along the leading axis this gives each
  device the blocks of its own items (zeros for padding items); a block cut
  into row chunks goes to every device that computes one of its chunks, or,
  where the blocks have no left factor, only the chunk's rows of it
  (``f32[num_shards · per_shard, rows, n]``: those rows of the result need
  no others). Plain slices and a stack of the matrix views: in a sharded
  program they keep the gradients' layout until the split moves them to
  their owners; ``layout`` (e.g. :meth:`BlockLayout.for_blocks`) lays out
  each block first.
  """
  blocks = [matrices[leaf][b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] for leaf, b in group.blocks]
  blocks = blocks if layout is None else [layout(block) for block in blocks]
  blocks.append(jnp.zeros(group.shape, jnp.float32))
  items = [item for share in group.items(num_shards) for item in share]
  if group.left is None and group.chunks > 1:
    return jnp.stack([_chunk(blocks[position], first, group.rows) for position, _, _, first in items])
  return jnp.stack([blocks[item[0]] for item in items])


def _chunk(block: jax.Array, first: int, rows: int) -> jax.Array:
  """Rows ``[first, first + rows)`` of a block, zero past its end."""
  part = block[first:first + rows]
  return jnp.pad(part, ((0, rows - part.shape[0]), (0, 0)))


def join_blocks(leaf_plan: partition.LeafPlan, block_of: Callable[[partition.BlockPlan], jax.Array]) -> jax.Array:
  """A leaf's matrix view put together from ``block_of(block_plan)`` of each of its blocks."""
  row_starts = sorted({b.rows[0] for b in leaf_plan.blocks})
  return jnp.block([[block_of(b) for b in leaf_plan.blocks if b.rows[0] == start] for start in row_starts])
