"""The factor engine shared by every optimizer of the library.

Shampoo (:mod:`optax_shampoo4.transform`) and SOAP (:mod:`optax_shampoo4.soap`)
keep the same kind of state: per preconditioned block ``G`` (m×n) a left factor
of order m and a right factor of order n, bucketed by order and storage kind
(:mod:`optax_shampoo4.partition`), each bucket in one of the formats of
:mod:`optax_shampoo4.factors`, optionally split over a device mesh
(:mod:`optax_shampoo4.sharding`). This module owns that shared machinery, so
that an optimizer is only its own step:

* :meth:`FactorEngine.plan` / :meth:`FactorEngine.init_buckets`: the static plan
  of a parameter tree and fresh buckets for it;
* :meth:`FactorEngine.refresh_stats`: fold every block's ``G Gᵀ`` / ``Gᵀ G``
  into its factors (the statistics update and eigenbasis refresh, PU), under
  ``shard_map`` when a mesh is given, with the per-factor failure policy;
* :meth:`FactorEngine.refresh_roots`: the inverse-root update (PIRU);
* :func:`map_blocks`: apply a per-block function to a parameter's matrix view
  and reassemble it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from optax_shampoo4 import factors as fct
from optax_shampoo4 import linalg, partition, sharding

Buckets = dict[str, fct.Bucket]


@dataclasses.dataclass(frozen=True)
class FactorEngine:
  """Plans, stores and refreshes the Kronecker factors of a parameter tree.

  Attributes:
    config: the factor format and its numerics (:class:`~optax_shampoo4.factors.FactorConfig`).
    max_order: largest factor order; larger dimensions are split into blocks.
    min_quant_order: factors of smaller order are stored in float32.
    mesh: optional device mesh; each bucket's factor axis is padded to a
      multiple of ``mesh.shape[mesh_axis]`` and refreshed under ``shard_map``.
    mesh_axis: the mesh axis the factors are split over.
    max_precond_dim: matrix dimensions above this get no factor (that side of
      their blocks is not preconditioned); None: all get factors.
  """

  config: fct.FactorConfig
  max_order: int
  min_quant_order: int
  mesh: jax.sharding.Mesh | None = None
  mesh_axis: str = "data"
  max_precond_dim: int | None = None

  @property
  def num_shards(self) -> int:
    return sharding.validate_mesh(self.mesh, self.mesh_axis)

  def plan(self, tree: Any) -> partition.Plan:
    """The static plan of a tree of arrays (or shape-carrying leaves)."""
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(tree)]
    return partition.make_plan(shapes, self.max_order, self.min_quant_order,
                               self.config.state_format != "fp32",
                               bucket_multiple=self.num_shards, max_precond_dim=self.max_precond_dim)

  def init_buckets(self, plan: partition.Plan, epsilon: jax.Array, with_root: bool = True) -> Buckets:
    """Fresh buckets (statistic :math:`\\epsilon I`, root :math:`I`).

    With ``with_root=False`` the buckets keep no inverse root (``root=None``):
    for optimizers that use the eigenbasis itself (SOAP).
    """
    buckets = {}
    for key, size in plan.bucket_sizes:
      bucket = fct.init_bucket(self.config, key.order, size, key.quantized, epsilon)
      buckets[key.name] = bucket if with_root else bucket._replace(root=None)
    return buckets

  def refresh_stats(self, buckets: Buckets, plan: partition.Plan, matrices: list,
                    beta: jax.Array) -> tuple[Buckets, jax.Array]:
    """PU for every bucket: folds each block's Gram matrices into its factors.

    Args:
      buckets: the current buckets.
      plan: the plan the buckets were built from.
      matrices: per leaf, its float32 matrix view (None for passthrough leaves).
      beta: EMA decay of the statistics.

    Returns:
      ``(new buckets, number of factor refreshes rejected as non-finite)``.
    """
    update = sharding.shard_over_factors(
        lambda bucket, grams, beta: fct.update_stats(self.config, bucket, grams, beta),
        self.mesh, self.mesh_axis, 2, 1)
    # Replicated grams: each device then slices its own factors, no resharding.
    grams = sharding.replicate(gram_matrices(plan, matrices), self.mesh)
    new, failures = {}, jnp.zeros([], jnp.int32)
    for key in plan.buckets:
      new[key.name], accepted = update(buckets[key.name], grams[key], beta)
      failures += jnp.sum(~accepted, dtype=jnp.int32)
    return new, failures

  def refresh_roots(self, buckets: Buckets, epsilon: jax.Array) -> tuple[Buckets, jax.Array]:
    """PIRU for every bucket; returns ``(new buckets, rejected root count)``."""
    update = sharding.shard_over_factors(
        lambda bucket, epsilon: fct.update_root(self.config, bucket, epsilon),
        self.mesh, self.mesh_axis, 1, 1)
    new, failures = {}, jnp.zeros([], jnp.int32)
    for name, bucket in buckets.items():
      new[name], accepted = update(bucket, epsilon)
      failures += jnp.sum(~accepted, dtype=jnp.int32)
    return new, failures

  def keep_split(self, buckets: Buckets) -> Buckets:
    """Keeps the returned buckets split over the mesh (identity without one)."""
    return sharding.split_factors(buckets, self.mesh, self.mesh_axis)

  def gathered(self, tree: Any) -> Any:
    """``tree`` replicated on every device, e.g. roots still quantized (identity without a mesh)."""
    return sharding.replicate(tree, self.mesh)


def no_refresh(buckets: Buckets) -> tuple[Buckets, jax.Array]:
  """The untaken branch of a gated refresh: same buckets, no failures."""
  return buckets, jnp.zeros([], jnp.int32)


def matrix_views(leaves: list, plan: partition.Plan) -> list:
  """Per leaf, its float32 matrix view (None for passthrough leaves)."""
  return [leaf.astype(jnp.float32).reshape(lp.matrix_shape) if lp.preconditioned else None
          for leaf, lp in zip(leaves, plan.leaves)]


def all_finite(leaves: list) -> jax.Array:
  """Whether every element of every leaf is finite (a scalar bool)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or [True]))


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


def map_blocks(matrix: jax.Array, leaf_plan: partition.LeafPlan,
               fn: Callable[[jax.Array, partition.BlockPlan], jax.Array]) -> jax.Array:
  """``fn(block, block_plan)`` on every block of a leaf's matrix view, reassembled.

  ``fn`` must return an array of the block's shape.
  """
  row_starts = sorted({b.rows[0] for b in leaf_plan.blocks})
  out_rows = []
  for start in row_starts:
    out_rows.append([fn(matrix[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]], b)
                     for b in leaf_plan.blocks if b.rows[0] == start])
  return jnp.block(out_rows)
