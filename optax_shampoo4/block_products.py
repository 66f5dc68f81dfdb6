"""The per-block products of the factor engine (:mod:`optax_shampoo4.engine`).

* :func:`gram_matrices`: per bucket, the stacked ``G Gᵀ`` / ``Gᵀ G`` of its
  blocks (the statistics of a step without a mesh);
* :func:`group_products`: one device's share of the every-step products of a
  :class:`~optax_shampoo4.partition.BlockGroup`, with only the rows of the
  left factors it needs dequantized (:func:`load_rows`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from optax_shampoo4 import factors as fct
from optax_shampoo4 import linalg, partition, tiered_rows
from optax_shampoo4 import quantization as qz


def gram_matrices(plan: partition.Plan, matrices: list) -> dict[partition.BucketKey, jax.Array]:
  """Per bucket, the stacked ``G Gᵀ`` (left) / ``Gᵀ G`` (right) of its blocks.

  Padding factors (past the real ones) get zero matrices.
  """
  grams = {}
  sizes = dict(plan.bucket_sizes)
  for key, slots in plan.factor_slots().items():
    parts = []
    for leaf_index, block_index, side in slots:
      block = plan.leaves[leaf_index].blocks[block_index]
      g = matrices[leaf_index][block.rows[0]:block.rows[1], block.cols[0]:block.cols[1]]
      gt = linalg.transpose(g)
      parts.append(linalg.matmul(g, gt) if side == "left" else linalg.matmul(gt, g))
    stacked = jnp.stack(parts)
    grams[key] = jnp.pad(stacked, [(0, sizes[key] - len(parts)), (0, 0), (0, 0)])
  return grams


def group_products(group: partition.BlockGroup, items: jax.Array, stored: dict, local_blocks: jax.Array,
                   fn: Callable, load: Callable | None = None) -> jax.Array:
  """``fn`` on one device's items of ``group`` -> ``[per_shard, rows, n]``.

  ``items``: ``int32[per_shard, 4]`` (:meth:`~optax_shampoo4.partition.BlockGroup.items`);
  ``local_blocks``: ``f32[per_shard, m, n]``, each item's block; ``load``: see :func:`load_rows`.
  """
  left = None if group.left is None else load_rows(stored[group.left.name], items[:, 1], items[:, 3], group.rows,
                                                   load)
  right = None if group.right is None else (load or fct.load)(
      jax.tree.map(lambda x: jnp.take(x, items[:, 2], axis=0), stored[group.right.name]))
  return jax.vmap(fn)(left, local_blocks, right)


def load_rows(stored: fct.StoredMatrix, slots: jax.Array, first_rows: jax.Array, num_rows: int,
              load: Callable | None = None) -> jax.Array:
  """Rows ``first_rows[i] + [0, num_rows)`` of matrix ``slots[i]`` of a stacked ``[k, n, n]``, in float32.

  With ``load`` None only those rows are dequantized (quantization blocks
  lie along rows); a ``load`` that needs whole matrices (SOAP's bases,
  rectified tier by tier) decodes each slot's matrix whole, then the rows
  are taken. Rows past ``n`` are zero. Returns ``f32[len(slots), num_rows, n]``.
  """
  if load is not None:
    return _rows_of(load(jax.tree.map(lambda x: jnp.take(x, slots, axis=0), stored)), first_rows, num_rows)
  leaves = jax.tree.leaves(stored)
  k, order = leaves[0].shape[:2]
  rows = first_rows[:, None] + jnp.arange(num_rows)  # [items, num_rows], row within its matrix
  valid = rows < order
  flat_rows = slots[:, None] * order + jnp.minimum(rows, order - 1)

  def gather(x):  # [k, order, ...] -> [items, num_rows, ...]
    return x.reshape((k * order,) + x.shape[2:])[flat_rows]

  picked = jax.tree.map(gather, stored)
  if isinstance(picked, qz.OffDiagQuantized):
    values = qz.dequantize(picked.offdiag)
    values = jnp.where(jnp.arange(order) == rows[..., None], picked.diag[..., None], values)
  else:
    values = fct.load(picked)
  return jnp.where(valid[..., None], values, 0.0)


def _rows_of(matrices, first_rows: jax.Array, num_rows: int):
  """Rows ``first_rows[i] + [0, num_rows)`` of each ``matrices[i]`` (``[items, n, n]``); rows past ``n`` zero.

  Whole matrices (one chunk each) are returned as ``load`` gave them (e.g.
  :class:`~optax_shampoo4.tiered_rows.TieredRows`); chunks are cut from them formed.
  """
  order = jax.tree.leaves(matrices)[0].shape[-1]
  if num_rows == order:  # whole blocks (one chunk each): every item starts at row 0
    return matrices
  matrices = tiered_rows.as_matrix(matrices)
  rows = first_rows[:, None] + jnp.arange(num_rows)
  picked = jnp.take_along_axis(matrices, jnp.minimum(rows, order - 1)[..., None], axis=1)
  return jnp.where((rows < order)[..., None], picked, 0.0)
