r"""SOAP's eigenbases (:func:`~optax_shampoo4.scale_by_soap4`): the bases each step rotates with, their
refresh, and the rotations.

* :func:`bases`: per bucket the eigenvectors as rows, :math:`Q^\top`, dequantized, rectified (Björck, or
  head first with a 16-bit head) and gathered from the mesh.
* :func:`refresh_bases`: the refresh of every basis (one warm-started QR step from the eigen-pair statistic,
  or :mod:`optax_shampoo4.soap_dense`'s from the dense one), with Adam's moments carried into the new bases
  by the change of basis :math:`C = Q_{new}^\top Q_{old}` (:func:`basis_change`): :math:`m \leftarrow
  C_L m C_R^\top`, and :math:`v` permuted or projected with :math:`C \circ C`.
* :func:`rotate`: :math:`Q_L^\top X Q_R` block by block (and back), split over the mesh by
  :meth:`~optax_shampoo4.engine.FactorEngine.apply_blocks`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from optax_shampoo4 import engine, linalg, options, partition, sharding, soap_dense, tiered_rows
from optax_shampoo4 import factors as fct
from optax_shampoo4 import quantization as qz


class Rows(NamedTuple):
  r"""Per bucket, matrices the products use as rows (a basis :math:`Q^\top`, a change of basis) as ``stored``,
  and the ``load`` that makes a stack of them float32 (None: ``stored`` holds those float32 matrices).

  On a mesh the products call ``load`` on each device for the factors of its own blocks only
  (:meth:`~optax_shampoo4.engine.FactorEngine.apply_blocks`).
  """

  stored: dict
  load: Callable[[Any], tiered_rows.Rows] | None


def bases(opts: options.SoapOptions, factor_engine: engine.FactorEngine, buckets: engine.Buckets) -> dict:
  r"""Per bucket, the eigenvectors as rows (:math:`Q^\top`), dequantized, rectified and gathered.

  With a head (16-bit by default), each step projects every tier of rows out of the more precise
  ones before it, after ``bjorck_steps[1]`` Björck steps on all but the 4-bit rows (none by
  default); the 4-bit rows' own Björck (:math:`2n^3` per factor, most of the step) is not run
  (see ``head_fraction``).
  """
  return rows_of(Rows(_gathered_eigvecs(factor_engine, buckets), functools.partial(rectified_rows, opts)))


def step_bases(opts: options.SoapOptions, factor_engine: engine.FactorEngine, plan: partition.Plan,
               buckets: engine.Buckets) -> Rows:
  """The bases a step rotates with (:func:`rotate`'s ``rows`` and ``load``).

  Without a mesh, every basis decoded and rectified once (:func:`rectified_rows`;
  a bucket whose blocks are all narrower on their other side than its 4-bit
  rows stays :class:`~optax_shampoo4.tiered_rows.TieredRows`, projected inside
  the products: :func:`~optax_shampoo4.tiered_rows.for_products`). On a mesh, the stored eigenvectors
  gathered (still quantized): each device decodes and rectifies only the bases
  of its own blocks, inside the products, instead of every basis on every
  device (the projections of the tiers cost about as much as the rotations
  themselves).
  """
  eigvecs = _gathered_eigvecs(factor_engine, buckets)
  if factor_engine.mesh is None:
    others = _other_dims(plan)
    return Rows({name: tiered_rows.for_products(rectified_rows(opts, stored), others.get(name, []))
                 for name, stored in eigvecs.items()}, None)
  return Rows(eigvecs, functools.partial(rectified_rows, opts))


def _other_dims(plan: partition.Plan) -> dict[str, list[int]]:
  """Per bucket, each factor's block's size along its other side (the products' other dimension)."""
  others: dict[str, list[int]] = {}
  for key, slots in plan.factor_slots().items():
    for leaf_index, block_index, side in slots:
      block = plan.leaves[leaf_index].blocks[block_index]
      rows, cols = block.rows[1] - block.rows[0], block.cols[1] - block.cols[0]
      others.setdefault(key.name, []).append(cols if side == "left" else rows)
  return others


def rows_of(step: Rows) -> dict:
  """Per bucket the float32 rows of a step's bases, formed (on a mesh, every basis decoded on every device)."""
  loaded = step.stored if step.load is None else {name: step.load(stored) for name, stored in step.stored.items()}
  return {name: tiered_rows.as_matrix(rows) for name, rows in loaded.items()}


def rectified_rows(opts: options.SoapOptions, stored: fct.StoredMatrix) -> tiered_rows.Rows:
  """Stored eigenvectors (a stack) as the steps use them: dequantized, then rectified as :func:`bases` says.

  A tiered basis whose 4-bit rows are only projected (``tail_rectify`` not
  ``"qr_every_step"``) comes as :class:`~optax_shampoo4.tiered_rows.TieredRows`:
  the more precise tiers rectified, the 4-bit rows as decoded; the products
  project them (:mod:`optax_shampoo4.tiered_rows`).
  """
  if isinstance(stored, qz.SplitRowsQuantized) and opts.tail_rectify != "qr_every_step":
    tiers = [qz.dequantize(part) for part in qz.row_tiers(stored)]
    head = linalg.rectified_tiers(tiers[:-1], opts.bjorck_steps[1], always_project=True)
    return tiered_rows.TieredRows(head, tiers[-1])
  return fct.rectified(stored, opts.bjorck_steps[1], tail_steps=0, tail_qr=opts.tail_rectify == "qr_every_step",
                       always_project=True)


def _gathered_eigvecs(factor_engine: engine.FactorEngine, buckets: engine.Buckets) -> dict:
  eigvecs = {}
  for name, bucket in buckets.items():
    if not isinstance(bucket, fct.EigenFactors):
      raise TypeError(f"SOAP's buckets are EigenFactors, got {type(bucket).__name__} for bucket {name!r}")
    eigvecs[name] = factor_engine.gathered(bucket.eigvecs)
  return eigvecs


def statistic_beta(opts: options.SoapOptions) -> jax.Array:
  r"""The statistic's EMA decay per fold: ``shampoo_beta``; where it is None, ``b2`` for the dense
  statistic (folded every step) and :math:`b_2^f` (``f`` = ``precondition_every``) for the refresh
  statistic (folded every ``f`` steps: the same time constant)."""
  if opts.shampoo_beta is not None:
    return jnp.asarray(opts.shampoo_beta, jnp.float32)
  b2 = jnp.asarray(opts.b2, jnp.float32)
  if opts.statistic == "dense":
    return b2
  return b2 ** jnp.asarray(opts.precondition_every, jnp.float32)


def refresh_bases(opts: options.SoapOptions, factor_engine: engine.FactorEngine, step: engine.Step,
                  current: Rows, stats: Any, first: jax.Array, operand: tuple) -> tuple:
  """Refreshes the bases (folding the gradient in first for the refresh statistic) and carries the moments.

  ``current``: the bases the step used (:func:`step_bases`);
  ``operand`` is ``(buckets, mu, nu)``; returns ``(buckets, mu, nu, failures)``.
  ``stats`` (the dense statistics) and ``first`` (the first refresh) are
  used by ``statistic="dense"`` only.
  """
  buckets, mu, nu = operand
  if current.load is None:
    # Decoded again from the stored codes, as the step did (cheap; the step's float32 bases then need not
    # stay alive through the refresh, which kept XLA:CPU's scratch per step below glibc's mmap threshold).
    current = Rows(_gathered_eigvecs(factor_engine, buckets), functools.partial(rectified_rows, opts))
  if opts.statistic == "dense":
    buckets, kept, failures, accepted, refreshed = soap_dense.refresh(factor_engine, step.plan, buckets, stats,
                                                                      rows_of(current), first)
  else:
    # Sorted by eigenvalue (descending) inside the refresh: the refreshed columns come out sorted, so
    # the head holds the largest eigenvalues' rows.
    order = {name: jnp.argsort(-b.eigvals, axis=-1) for name, b in buckets.items()}
    buckets, failures, accepted, refreshed = factor_engine.refresh_eigen_stats(
        buckets, step.plan, step.matrices, statistic_beta(opts), order)
    # A rejected factor kept its previous eigenpairs, in their previous order.
    kept = {name: jnp.where(accepted[name][:, None], o, jnp.arange(o.shape[-1])) for name, o in order.items()}
  if not opts.project_nu:
    kept = factor_engine.gathered(kept)  # indexed per block below: whole on every device
    nu = [_permute(v, lp, kept) if lp.preconditioned else v for v, lp in zip(nu, step.plan.leaves)]
  change = basis_change(opts, factor_engine, buckets, current, refreshed, factor_engine.gathered(accepted))
  mu = rotate_moments(factor_engine, step.plan, mu, change, opts.precision)
  if opts.project_nu:
    nu = rotate_moments(factor_engine, step.plan, nu, squared(change), opts.precision)
  return buckets, mu, nu, failures


def basis_change(opts: options.SoapOptions, factor_engine: engine.FactorEngine, buckets: engine.Buckets,
                 current: Rows, refreshed: dict, accepted: dict) -> Rows:
  r"""Per bucket the change of basis :math:`C = R_{new} R_{old}^\top` the moments are carried by.

  :math:`R_{old}` = ``current``, the basis the moments live in (as the steps
  used it: decoded and rectified). ``carry="refreshed"``: :math:`R_{new}` =
  ``refreshed``, the refresh's float32 eigenvectors before they are stored,
  so :math:`C` holds the refresh's rotation (and re-sorting) only, and the
  identity where a refresh was rejected (``accepted`` False: the basis is
  kept). ``"decoded"``: :math:`R_{new}` is the new basis decoded and
  rectified as the steps will use it; with a quantized basis :math:`C` then
  also holds both bases' rounding (entries of about 0.02 at 4 bits), which
  moves the large coordinates' moments into the small ones at every refresh.
  Without a mesh every :math:`C` is formed here; on a mesh each device forms
  those of its own blocks' factors in the products (:class:`Rows`).
  """
  new = _gathered_eigvecs(factor_engine, buckets) if opts.carry == "decoded" else refreshed
  stored = {name: (new[name], old, accepted[name]) for name, old in current.stored.items()}
  load = functools.partial(_change_of_basis, opts, current.load)
  if factor_engine.mesh is None:
    return Rows({name: load(parts) for name, parts in stored.items()}, None)
  return Rows(stored, load)


def squared(change: Rows) -> Rows:
  r"""The change of basis :math:`C \circ C` (elementwise) that carries Adam's second moment."""
  load = change.load
  if load is None:
    return Rows({name: c * c for name, c in change.stored.items()}, None)
  return Rows(change.stored, lambda parts: jnp.square(tiered_rows.as_matrix(load(parts))))


def _change_of_basis(opts: options.SoapOptions, load_old: Callable | None, parts: tuple) -> jax.Array:
  """:math:`C` of a stack of factors from ``(new basis, old basis as stored, accepted)``; see :func:`basis_change`."""
  new, old, accepted = parts
  old = tiered_rows.as_matrix(old if load_old is None else load_old(old))
  if opts.carry == "decoded":
    return linalg.matmul(tiered_rows.as_matrix(rectified_rows(opts, new)), linalg.transpose(old))
  c = linalg.matmul(new, linalg.transpose(old))
  return jnp.where(accepted[:, None, None], c, jnp.eye(c.shape[-1], dtype=c.dtype))


def rotate(factor_engine: engine.FactorEngine, plan: partition.Plan, matrices: list, rows: dict,
           forward: bool, precision: str = "highest", load: Callable[[Any], tiered_rows.Rows] | None = None) -> list:
  r"""Per preconditioned leaf, every block rotated: :math:`R_L X R_R^\top` (``forward``) or :math:`R_L^\top X R_R`.

  ``rows`` holds per factor the matrix :math:`R` (the basis as rows,
  :math:`Q^\top`, or a change of basis), or per bucket what ``load`` makes
  those rows of (:attr:`Rows.load`). The products are split over the
  mesh (:meth:`~optax_shampoo4.engine.FactorEngine.apply_blocks`) at
  ``precision`` (:func:`~optax_shampoo4.linalg.step_matmul`), in whole
  blocks where they need whole columns of :math:`R_L` (backward) or decode
  the bases (``load``): then the forward and backward products of a step
  give each device the same items, and XLA computes its bases' identical
  decodings once. Other leaves give None.
  """
  views = [m if lp.preconditioned else None for m, lp in zip(matrices, plan.leaves)]
  if forward:
    return factor_engine.apply_blocks(plan, views, rows, functools.partial(forward_product, precision=precision),
                                      split_rows=load is None, load=load)
  return factor_engine.apply_blocks(plan, views, rows, functools.partial(backward_product, precision=precision),
                                    split_rows=False, load=load)


def rotate_moments(factor_engine: engine.FactorEngine, plan: partition.Plan, moments: list, change: Rows,
                   precision: str = "highest") -> list:
  """Moments carried into new bases: preconditioned leaves rotated forward by ``change``, others kept."""
  rotated = rotate(factor_engine, plan, moments, change.stored, forward=True, precision=precision, load=change.load)
  return [r if lp.preconditioned else m for r, m, lp in zip(rotated, moments, plan.leaves)]


def forward_product(left_rows: tiered_rows.Rows | None, block: jax.Array, right: tiered_rows.Rows | None,
                    precision: str = "highest") -> jax.Array:
  r""":math:`R_L X R_R^\top` of one block (rows of it, given rows of :math:`R_L`); a None side is the identity."""
  if left_rows is not None:
    block = tiered_rows.rows_times(left_rows, block, precision)
  if right is not None:
    block = tiered_rows.times_rows_transposed(block, right, precision)
  return block


def backward_product(left: tiered_rows.Rows | None, block: jax.Array, right: tiered_rows.Rows | None,
                     precision: str = "highest") -> jax.Array:
  r""":math:`R_L^\top X R_R` of one block; a None side is the identity."""
  if left is not None:
    block = tiered_rows.rows_transposed_times(left, block, precision)
  if right is not None:
    block = tiered_rows.times_rows(block, right, precision)
  return block


def _permute(matrix: jax.Array, leaf_plan: partition.LeafPlan, order: dict) -> jax.Array:
  """Per block: rows and columns reordered as the block's left / right eigenvectors."""

  def permute_block(block, b):
    split = block
    block = sharding.unsplit(block)  # explicit sharding: the gathers need whole rows and columns
    if b.left is not None:
      block = jnp.take(block, order[b.left.bucket.name][b.left.index], axis=0)
    if b.right is not None:
      block = jnp.take(block, order[b.right.bucket.name][b.right.index], axis=1)
    return sharding.laid_out_like(block, split)

  return engine.map_blocks(matrix, leaf_plan, permute_block)
