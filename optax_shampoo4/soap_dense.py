r"""SOAP's dense statistic (``statistic="dense"`` of :func:`~optax_shampoo4.scale_by_soap4`): the authors' semantics.

Per factor a dense float32 statistic :math:`S` (``[k, n, n]`` per bucket,
stored as :class:`~optax_shampoo4.factor_state.MatrixFactors` with ``root=None`` so
that it is split over a mesh like the factors), folded from zeros at *every*
step whose gradient is finite,

.. math:: S \leftarrow \beta_s S + (1-\beta_s)\, G G^\top \quad (G^\top G \text{ on the right}),

and the basis refreshed from it as the authors do:

* call 1: :math:`Q` = eigenvectors of :math:`S + 10^{-30} I`, descending;
* every ``precondition_every`` Adam steps after it: the columns of :math:`Q`
  sorted by :math:`\mathrm{diag}(Q^\top S Q)` descending (the permutation
  :math:`o` is returned so that :math:`v` is permuted with them), then one
  warm-started power step :math:`Q \leftarrow \mathrm{qr}(S\, Q_{:,o}).Q`.

The eigenvalues stored beside the basis are the Rayleigh quotients
:math:`\mathrm{diag}(Q^\top S Q)` of the new basis (not used by the step).
This costs :math:`n^2` float32 per factor on top of the eigen-pair: it is
the reference-matching mode, not the low-memory one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_shampoo4 import block_products, engine, linalg, partition, sharding
from optax_shampoo4 import factors as fct

# The reference adds 1e-30 I before its first eigh (a no-op unless S is ~0).
FIRST_EIGH_SHIFT = 1e-30


def init_stats(plan: partition.Plan) -> dict[str, fct.MatrixFactors]:
  """Zero statistics, one ``[k, n, n]`` float32 array per bucket of ``plan``."""
  return {key.name: fct.MatrixFactors(jnp.zeros((size, key.order, key.order), jnp.float32), None)
          for key, size in plan.bucket_sizes}


def fold(stats: dict[str, fct.MatrixFactors], plan: partition.Plan, matrices: list, beta: jax.Array,
         finite: jax.Array) -> dict[str, fct.MatrixFactors]:
  r""":math:`S \leftarrow \beta S + (1-\beta) G G^\top` per factor where ``finite``, else ``S`` unchanged."""
  beta = jnp.asarray(beta, jnp.float32)
  grams = block_products.gram_matrices(plan, matrices)
  new = {}
  for key in plan.buckets:
    old = fct.load(fct.kept(stats[key.name].stats, "stats"))  # dense float32: returned as it is
    folded = beta * old + (1.0 - beta) * grams[key].astype(jnp.float32)
    new[key.name] = fct.MatrixFactors(jnp.where(finite, folded, old), None)
  return new


def refresh_factors(config: fct.FactorConfig, bucket: fct.EigenFactors, stat: jax.Array, rows: jax.Array,
                    first: jax.Array) -> tuple[fct.EigenFactors, jax.Array, jax.Array, jax.Array]:
  r"""One bucket's refresh from its dense statistics (see the module docstring).

  Args:
    config: the factor settings (how the new basis is stored).
    bucket: the stored eigen-pairs ``[k, ...]``.
    stat: ``[k, n, n]``, the folded statistics.
    rows: ``[k, n, n]``, the current basis as rows (:math:`Q^\top`, rectified).
    first: scalar bool, the first refresh (an ``eigh``; no sort).

  Returns:
    ``(bucket, order, accepted, refreshed)``: the new bucket, ``int[k, n]``
    the sort applied to the old basis' columns (the identity where rejected
    or at the first refresh), ``bool[k]`` accepted (finite) per factor and
    ``f32[k, n, n]`` the new basis as rows before it is stored (quantized;
    ``rows`` where rejected).
  """
  size, order_n = stat.shape[0], stat.shape[-1]
  estimates = jnp.sum(rows * linalg.matmul(rows, stat), axis=-1)  # diag(Qᵀ S Q), Q = rowsᵀ
  identity = jnp.broadcast_to(jnp.arange(order_n), (size, order_n))
  order = jnp.where(first, identity, jnp.argsort(-estimates, axis=-1, stable=True))
  cols = linalg.transpose(jnp.take_along_axis(rows, order[:, :, None], axis=1))
  eigvecs, eigvals = linalg.qr_refresh(stat, cols, 1, sort=False)
  shifted = stat + FIRST_EIGH_SHIFT * jnp.eye(order_n, dtype=jnp.float32)
  need = jnp.broadcast_to(first, (size,))
  eigvecs, eigvals = linalg.eigh_where(need, shifted, eigvecs, eigvals)
  accepted = _finite_per_factor(eigvecs) & _finite_per_factor(eigvals)
  refreshed = linalg.transpose(eigvecs)
  stored = config.store_eigvecs(refreshed, fct.is_quantized(bucket.eigvecs))
  new = jax.tree.map(lambda a, b: jnp.where(accepted.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                     fct.EigenFactors(stored, eigvals, bucket.root), bucket)
  refreshed = jnp.where(accepted[:, None, None], refreshed, rows)
  return new, jnp.where(accepted[:, None], order, identity), accepted, refreshed


def _finite_per_factor(x: jax.Array) -> jax.Array:
  """``[k, ...] -> bool[k]``: all entries of each factor finite."""
  return jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)


def refresh(factor_engine: engine.FactorEngine, plan: partition.Plan, buckets: engine.Buckets,
            stats: dict[str, fct.MatrixFactors], rows: dict, first: jax.Array
            ) -> tuple[engine.Buckets, dict[str, jax.Array], jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """Every bucket refreshed from its dense statistics (split over the mesh, as the engine's refreshes).

  Returns ``(buckets, {bucket name: int[k, n]} column orders, number of
  rejected (non-finite) real factors, {bucket name: bool[k]} accepted,
  {bucket name: f32[k, n, n]} the new bases as rows before they were
  stored, gathered)``.
  """

  def one(bucket, stat, bucket_rows, first):
    return refresh_factors(factor_engine.config, bucket, stat, bucket_rows, first)

  update = sharding.shard_over_factors(one, factor_engine.mesh, factor_engine.mesh_axis, 3, 1)
  real = {key.name: len(slots) for key, slots in plan.factor_slots().items()}
  new, orders, accepted, refreshed, failures = {}, {}, {}, {}, jnp.zeros([], jnp.int32)
  for key in plan.buckets:
    name = key.name
    new[name], orders[name], accepted[name], refreshed[name] = update(buckets[name], stats[name].stats,
                                                                      rows[name], first)
    failures += jnp.sum(~accepted[name][:real[name]], dtype=jnp.int32)
  return new, orders, failures, accepted, factor_engine.gathered(refreshed)
