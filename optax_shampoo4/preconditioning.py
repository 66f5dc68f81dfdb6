r"""Shampoo's every-step preconditioning: :math:`\hat L X \hat R` (or CASPR's combination) of every block,
split over the mesh by the factor engine, and the grafting of the result onto the grafted method's direction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from optax_shampoo4 import engine, linalg, options, partition, sharding
from optax_shampoo4 import factors as fct
from optax_shampoo4 import grafting as grafting_lib


def precondition_blocks(opts: options.ShampooOptions, factor_engine: engine.FactorEngine,
                        buckets: engine.Buckets, plan: partition.Plan, matrices: list,
                        epsilon: jax.Array) -> list:
  r"""Per leaf, :math:`\hat L X \hat R` (or CASPR's combination) of every block of its matrix view.

  The roots are gathered still quantized (a quarter of the float32 bytes at 8
  bits, an eighth at 4); with a mesh each device dequantizes and applies only
  its share of them (:meth:`~optax_shampoo4.engine.FactorEngine.apply_blocks`).
  Buckets that store no root (``store_root`` False or ``"eigvals"``) are
  applied from the roots' factors (:func:`factored_shampoo_product`) unless
  CASPR combines them. CASPR, preconditioned vectors (:math:`\hat L^2 x`)
  and factored roots need whole left roots, so their blocks are split over
  the devices but not cut into row chunks. ``epsilon``: the roots' damping (:func:`~optax_shampoo4.shampoo.root_epsilon`), used when
  no root is stored.
  """
  # With no stored root, plain Shampoo applies each root as W (Wᵀ X) from its factor W (2n²m multiply-adds for
  # an n×m block; forming W Wᵀ first costs n³ + n²m); CASPR's four products take the formed roots.
  caspr = opts.combine == "caspr"
  factored = opts.store_root is not True and not caspr
  roots: dict[str, fct.StoredMatrix]
  if opts.store_root is True:
    roots = {name: factor_engine.gathered(bucket.root) for name, bucket in buckets.items()}
  else:
    roots = {**factor_engine.roots_from_eigenbases(buckets, epsilon, opts.precision, factored)}
  product = caspr_product if caspr else factored_shampoo_product if factored else shampoo_product
  return factor_engine.apply_blocks(plan, matrices, roots, functools.partial(product, precision=opts.precision),
                                    split_rows=not (caspr or factored or opts.precondition_1d))


def graft_outputs(opts: options.ShampooOptions, step: engine.Step, grafted: list, preconditioned: list) -> list:
  """Per leaf, the output: the preconditioned direction grafted, or the grafted method's alone.

  Leaves Shampoo does not precondition, steps before
  ``start_preconditioning_step`` and non-finite steps (zeros) take no
  preconditioned direction.
  """
  start = opts.start_preconditioning_step
  outputs = []
  for leaf, direction, shampoo, lp in zip(step.leaves, grafted, preconditioned, step.plan.leaves):
    if lp.preconditioned:
      shampoo = graft_blocks(shampoo, sharding.reshape(direction, lp.view_shape), lp, opts.grafting.per_block)
      shampoo = sharding.reshape(shampoo, leaf.shape, like=leaf)
      direction = shampoo if start is None else jnp.where(step.count < start, direction, shampoo)
    outputs.append(jnp.where(step.grads_finite, direction.astype(leaf.dtype), jnp.zeros_like(leaf)))
  return outputs


def shampoo_product(left_root: jax.Array, block: jax.Array, right_root: jax.Array | None,
                    precision: str = "highest") -> jax.Array:
  """``L̂ G R̂`` of one block (rows of it, given rows of ``L̂``); ``L̂ L̂ x`` of a vector block (no right root);
  the products at ``precision`` (:func:`linalg.step_matmul`)."""
  product = functools.partial(linalg.step_matmul, precision=precision)
  if right_root is None:  # a vector (precondition_1d): exponent -1/2 from the 4th root applied twice
    return product(left_root, product(left_root, block))
  return product(product(left_root, block), right_root)


def factored_shampoo_product(left_factor: jax.Array, block: jax.Array, right_factor: jax.Array | None,
                             precision: str = "highest") -> jax.Array:
  r""":func:`shampoo_product` from the roots' factors: :math:`\hat L = W_L W_L^\top`, :math:`\hat R = W_R W_R^\top`.

  :math:`\hat L G \hat R = W_L (W_L^\top G)\, W_R W_R^\top`, whole blocks (the
  inner product needs every row of :math:`W_L`); a vector block (no right
  factor) gets :math:`\hat L \hat L x`. Products at ``precision``.
  """
  product = functools.partial(linalg.step_matmul, precision=precision)

  def left(x):
    return product(left_factor, product(linalg.transpose(left_factor), x))

  if right_factor is None:
    return left(left(block))
  return product(product(left(block), right_factor), linalg.transpose(right_factor))


def caspr_product(left_root: jax.Array, block: jax.Array, right_root: jax.Array | None,
                  precision: str = "highest") -> jax.Array:
  """CASPR's combination of one block: ``J = L̂G + GR̂``, ``L̂J + JR̂``; ``L̂ L̂ x`` of a vector block; at ``precision``."""
  if right_root is None:  # a vector (precondition_1d): J = L̂x, L̂J
    return shampoo_product(left_root, block, None, precision)
  product = functools.partial(linalg.step_matmul, precision=precision)
  j = product(left_root, block) + product(block, right_root)
  return product(left_root, j) + product(j, right_root)


def graft_blocks(preconditioned, grafted, leaf_plan: partition.LeafPlan, per_block: bool) -> jax.Array:
  """``preconditioned`` (a matrix view) rescaled to the norm of the grafted direction.

  The norms are over the whole matrix, or over each block when ``per_block``.
  """
  if per_block:
    def grafted_block(block, b):
      return grafting_lib.graft(block, grafted[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]])
    return engine.map_blocks(preconditioned, leaf_plan, grafted_block)
  return grafting_lib.graft(preconditioned, grafted)


def precondition(matrix: jax.Array, grafted: jax.Array, leaf_plan: partition.LeafPlan, roots: dict,
                 per_block: bool, precision: str = "highest") -> jax.Array:
  """``L̂ X R̂`` per block of a matrix view from dequantized ``roots``, grafted (one device, no mesh).

  The norms are over the whole matrix, or over each block when ``per_block``.
  """

  def left_right(block, b):
    right = None if b.right is None else roots[b.right.bucket.name][b.right.index]
    return shampoo_product(roots[b.left.bucket.name][b.left.index], block, right, precision)

  return graft_blocks(engine.map_blocks(matrix, leaf_plan, left_right), grafted, leaf_plan, per_block)
