r"""Gram matrices formed by the device that owns their factor.

A bucket's ``k`` factors (padded to a multiple of the mesh axis size ``N``)
are split over the devices in contiguous shares of ``k / N``: device ``d``
stores and refreshes factors ``[d k/N, (d+1) k/N)``. At a statistics step
each factor needs its block's Gram matrix, ``G Gᵀ`` (left factor) or ``Gᵀ G``
(right factor). Forming every Gram matrix on every device would cost each
device the whole tree's ``Σ 2 m n (m + n)`` flops; instead each device forms
only those of its own factors, inside the refresh's ``shard_map``.

The program under ``shard_map`` is the same on every device, so the work is
cut into **groups**: factors of one bucket whose Gram matrix is ``X Xᵀ`` for
an ``X`` of one shape (``X = G`` for a left factor, ``X = Gᵀ`` for a right
one, so that left and right factors of transposed block shapes share a group);
for each group a static table gives, per device, which of the group's blocks
it owns and where they go in its share, padded to the largest per-device
count of that group (padding picks a zero block and writes to a scratch row
that is dropped). Per device a group then costs ``max_d count_d`` batched
products of one shape.

The blocks reach their owners as arrays split over the devices
(:func:`owned_blocks`): per group and side, ``[N · width, rows, cols]`` with
device ``d``'s blocks of that side at ``[d · width, (d + 1) · width)``, built
from the gradients in whatever layout they have (replicated, or split like
FSDP parameters) and laid out over the mesh axis by ``shard_map``; XLA moves
each block to its owner (a local slice of replicated gradients, an all-to-all
of split ones), and no device receives blocks it does not own. Blocks move in
their own orientation (a right factor's ``G`` is transposed by its owner):
stacking some blocks transposed would mix two layouts of split gradients in
one array, which XLA resolves by gathering it whole.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from optax_shampoo4 import linalg, partition


@dataclasses.dataclass(frozen=True)
class GramGroup:
  """Factors of one bucket whose Gram matrices are ``X Xᵀ`` with ``X`` of one shape.

  Attributes:
    blocks: ``(leaf, rows, cols, side)`` of each of the group's blocks;
      ``X`` is the block for ``side == "left"`` (``G Gᵀ``), its transpose
      for ``"right"`` (``Gᵀ G``).
    picks: per device, indices into ``blocks`` of the blocks it owns
      (``len(blocks)``: padding, a zero block).
    positions: per device, where each pick goes in its share of the bucket
      (the share size: padding, dropped).
  """

  blocks: tuple[tuple[int, tuple[int, int], tuple[int, int], str], ...]
  picks: tuple[tuple[int, ...], ...]
  positions: tuple[tuple[int, ...], ...]

  def side_picks(self, side: str) -> tuple[tuple[int, ...], ...]:
    """Per device, its picks of the blocks of one side (``"left"`` / ``"right"``), padded to the widest device."""
    owned = [[j for j in picks if j < len(self.blocks) and self.blocks[j][3] == side] for picks in self.picks]
    width = max(len(o) for o in owned)
    return tuple(tuple(o + [len(self.blocks)] * (width - len(o))) for o in owned)

  def local_picks(self) -> tuple[tuple[int, ...], ...]:
    """Per device, where each pick is in its received blocks: its left ones, then its right ones, then a zero."""
    lefts, rights = self.side_picks("left"), self.side_picks("right")
    left_width, right_width = len(lefts[0]), len(rights[0])
    out = []
    for picks, left, right in zip(self.picks, lefts, rights):
      where = {j: i for i, j in enumerate(left) if j < len(self.blocks)}
      where.update({j: left_width + i for i, j in enumerate(right) if j < len(self.blocks)})
      out.append(tuple(where.get(j, left_width + right_width) for j in picks))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class OwnedGrams:
  """The static table of one bucket: its share per device and its groups."""

  order: int
  share: int
  groups: tuple[GramGroup, ...]

  @property
  def per_device_products(self) -> int:
    """Products each device forms at a statistics step (padding included)."""
    return sum(len(group.picks[0]) for group in self.groups)


def owned_gram_tables(plan: partition.Plan, num_shards: int) -> dict[str, OwnedGrams]:
  """``{bucket name: OwnedGrams}`` of ``plan`` split over ``num_shards`` devices."""
  sizes = dict(plan.bucket_sizes)
  tables = {}
  for key, slots in plan.factor_slots().items():
    share = sizes[key] // num_shards
    by_shape: dict[tuple, list[tuple[int, tuple, tuple, str, int]]] = {}
    for index, (leaf_index, block_index, side) in enumerate(slots):
      block = plan.leaves[leaf_index].blocks[block_index]
      shape = (block.rows[1] - block.rows[0], block.cols[1] - block.cols[0])
      shape = shape if side == "left" else shape[::-1]  # of X
      by_shape.setdefault(shape, []).append((leaf_index, block.rows, block.cols, side, index))
    groups = []
    for members in by_shape.values():
      owned = [[(j, index % share) for j, (*_, index) in enumerate(members) if index // share == d]
               for d in range(num_shards)]
      width = max(len(o) for o in owned)
      pad = [(len(members), share)] * width
      groups.append(GramGroup(
          blocks=tuple(member[:4] for member in members),
          picks=tuple(tuple(j for j, _ in (o + pad)[:width]) for o in owned),
          positions=tuple(tuple(p for _, p in (o + pad)[:width]) for o in owned)))
    tables[key.name] = OwnedGrams(order=key.order, share=share, groups=tuple(groups))
  return tables


def owned_blocks(table: OwnedGrams, matrices: list, num_shards: int,
                 layout: Callable[[tuple[int, ...]], Callable[[jax.Array], jax.Array]] | None = None
                 ) -> list[list[jax.Array | None]]:
  """Per group of ``table``, ``[left blocks, right blocks]``, each in device order: ``f32[num_shards · width, m, n]``.

  Device ``d``'s blocks of a side (:meth:`GramGroup.side_picks`) are at
  ``[d · width, (d + 1) · width)`` (zeros for padding; None where the group
  has no block of that side), each in the gradient's orientation, so that
  splitting the leading axis over ``num_shards`` devices gives each device
  exactly the blocks it owns. Plain slices and stacks of the matrix views:
  in a sharded program they keep the gradients' layout until the split moves them.

  Args:
    table: the bucket's static table (:func:`owned_gram_tables`).
    matrices: per leaf, its float32 matrix view (None for passthrough leaves).
    num_shards: number of devices (``len(group.picks)``).
    layout: optional ``layout(block shape)(block)``, a layout for each
      block before it is stacked (e.g. ``block_moves.BlockLayout.for_blocks``).
  """
  out = []
  for group in table.groups:
    blocks = [matrices[leaf][r0:r1, c0:c1] for leaf, (r0, r1), (c0, c1), _ in group.blocks]
    if layout is not None:
      blocks = [layout(x.shape)(x) for x in blocks]
    sides = []
    for side in ("left", "right"):
      picks = group.side_picks(side)
      if not picks[0]:
        sides.append(None)
        continue
      shape = next(x.shape for x, member in zip(blocks, group.blocks) if member[3] == side)
      padded = blocks + [jnp.zeros(shape, jnp.float32)]
      sides.append(jnp.stack([padded[j] for device in range(num_shards) for j in picks[device]]))
    out.append(sides)
  return out


def owned_grams(table: OwnedGrams, blocks: list, shard: jax.Array) -> jax.Array:
  """This device's share of one bucket's Gram matrices, ``f32[share, order, order]``.

  Args:
    table: the bucket's static table (:func:`owned_gram_tables`).
    blocks: per group, ``[left blocks, right blocks]`` of this device (its
      slice of :func:`owned_blocks`), ``f32[width, m, n]`` or None.
    shard: this device's index along the mesh axis (``lax.axis_index``).
  """
  out = jnp.zeros((table.share + 1, table.order, table.order), jnp.float32)
  for group, (lefts, rights) in zip(table.groups, blocks):
    received = [x for x in (lefts, None if rights is None else linalg.transpose(rights)) if x is not None]
    received = jnp.concatenate(received + [jnp.zeros_like(received[0][:1])])
    mine = jnp.take(received, jnp.asarray(group.local_picks(), jnp.int32)[shard], axis=0)
    grams = linalg.matmul(mine, linalg.transpose(mine))
    out = out.at[jnp.asarray(group.positions, jnp.int32)[shard]].set(grams)
  return out[:table.share]
