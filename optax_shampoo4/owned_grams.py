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
"""

from __future__ import annotations

import dataclasses

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


def owned_grams(table: OwnedGrams, matrices: list, shard: jax.Array) -> jax.Array:
  """This device's share of one bucket's Gram matrices, ``f32[share, order, order]``.

  Args:
    table: the bucket's static table (:func:`owned_gram_tables`).
    matrices: per leaf, its float32 matrix view (whole, on this device).
    shard: this device's index along the mesh axis (``lax.axis_index``).
  """
  out = jnp.zeros((table.share + 1, table.order, table.order), jnp.float32)
  for group in table.groups:
    blocks = [matrices[leaf][r0:r1, c0:c1] for leaf, (r0, r1), (c0, c1), _ in group.blocks]
    blocks = [x if side == "left" else x.T for x, (*_, side) in zip(blocks, group.blocks)]
    stacked = jnp.stack(blocks + [jnp.zeros_like(blocks[0])])
    mine = jnp.take(stacked, jnp.asarray(group.picks, jnp.int32)[shard], axis=0)
    grams = linalg.matmul(mine, linalg.transpose(mine))
    out = out.at[jnp.asarray(group.positions, jnp.int32)[shard]].set(grams)
  return out[:table.share]
