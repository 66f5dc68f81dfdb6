"""``scale_by_shampoo4``: the 4-bit Shampoo gradient transformation."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_shampoo4 import engine, linalg, optax_compat, partition, sharding, validation
from optax_shampoo4 import factors as fct
from optax_shampoo4 import grafting as grafting_lib
from optax_shampoo4 import quantization as qz

# Chosen by measurement (README, "Refresh methods"); the paper's refresh is refresh_method="qr".
DEFAULT_REFRESH_METHOD = "adaptive"
DEFAULT_REFRESH_TOL = 1e-3
COMBINES = ("shampoo", "caspr")
# Defaults of the shape-fixing options, which default to None in the signatures (so that
# optax.inject_hyperparams, which turns every int/float argument into an array, leaves them alone).
DEFAULT_MAX_ORDER = 1024
DEFAULT_BITS = 4
DEFAULT_QUANT_BLOCK = 64
DEFAULT_MIN_QUANT_ORDER = 64


class ScaleByShampoo4State(NamedTuple):
  """State of :func:`scale_by_shampoo4`.

  Attributes:
    count: ``int32[]``, number of ``update`` calls so far.
    factors: ``{bucket name: EigenFactors | MatrixFactors}``; every factor of
      one order and storage kind, stacked along a leading axis (see
      :mod:`optax_shampoo4.partition`).
    nonfinite_steps: ``int32[]``, steps whose gradient held a NaN or Inf in
      any leaf; such a step returns an all-zero update and leaves the
      statistics untouched.
    skipped_stats: ``int32[]``, statistics updates skipped (the subset of
      those steps that fell on a statistics step).
    failed_refreshes: ``int32[]``, factor refreshes (statistics or roots)
      rejected because their result was not finite; each such factor kept its
      previous value.
    grafting: :class:`~optax_shampoo4.grafting.GraftingState`, the
      parameter-shaped accumulators of the grafted method and the filtered
      gradient (None fields when not used).
  """

  count: jax.Array
  factors: dict[str, fct.Bucket]
  nonfinite_steps: jax.Array
  skipped_stats: jax.Array
  failed_refreshes: jax.Array
  grafting: grafting_lib.GraftingState = grafting_lib.GraftingState()


def _validate_refresh(refresh_method, qr_iterations, refresh_tol) -> int:
  """Checks the refresh arguments; returns the resolved number of QR steps."""
  if refresh_method not in fct.REFRESH_METHODS:
    raise ValueError(
        f"refresh_method must be one of {fct.REFRESH_METHODS}, got refresh_method={refresh_method!r}")
  if qr_iterations is None:
    qr_iterations = 1
  validation.check_int("qr_iterations", qr_iterations, 1)
  validation.check_range("refresh_tol", refresh_tol, 0.0, 1.0, high_inclusive=True)
  return int(qr_iterations)


def _validate(max_order, beta, epsilon, stats_every, root_every, state_format, bits,
              mapping, quant_block, min_quant_order, bjorck_steps, root_method) -> str:
  """Checks every argument (shape-fixing ones already resolved); returns the resolved root method."""
  validation.check_traceable_int("stats_every", stats_every, 1)
  validation.check_traceable_int("root_every", root_every, 1)
  if state_format not in fct.FORMATS:
    raise ValueError(f"state_format must be one of {fct.FORMATS}, got state_format={state_format!r}")
  qz.validate_mapping_bits(mapping, bits)
  qz.validate_block(quant_block, bits, "quant_block")
  if (not isinstance(bjorck_steps, (tuple, list)) or len(bjorck_steps) != 2
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
             for s in bjorck_steps)):
    raise ValueError(f"bjorck_steps must be a pair of ints >= 0, got bjorck_steps={bjorck_steps!r}")
  validation.check_range("beta", beta, 0.0, 1.0)
  validation.check_range("epsilon", epsilon, 0.0, math.inf)
  if root_method is None:
    return "eigen" if state_format == "eigen" else "newton"
  if root_method not in fct.ROOT_METHODS:
    raise ValueError(f"root_method must be one of {fct.ROOT_METHODS} or None, got root_method={root_method!r}")
  if root_method == "eigen" and state_format != "eigen":
    raise ValueError(
        f"root_method='eigen' needs state_format='eigen' (the {state_format!r} format keeps no "
        f"eigenvectors; it uses 'newton'), got root_method={root_method!r}")
  if root_method == "jorge" and state_format == "eigen":
    raise ValueError(
        "root_method='jorge' keeps only the inverse roots (no eigenvectors): use it with "
        f"state_format='naive' (4-bit root) or 'fp32', got state_format={state_format!r}")
  return root_method


def _check_leaf_dtypes(tree: Any, owner: str = "scale_by_shampoo4") -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float, np.generic)):
      raise TypeError(
          f"{owner}.init needs parameter arrays (or jax.ShapeDtypeStruct); got "
          f"{type(leaf).__name__} at {jax.tree_util.keystr(path) or 'the root'}")
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner} supports real floating-point parameters only; the leaf at "
          f"{jax.tree_util.keystr(path)} has dtype {dtype}. Route it to another optimizer "
          f"with optax.partition or optax.masked.")


def scale_by_shampoo4(
    max_order: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    epsilon: jax.typing.ArrayLike = 1e-6,
    stats_every: int = 100,
    root_every: int = 500,
    state_format: str = "eigen",
    bits: int | None = None,
    mapping: str = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] = (1, 4),
    root_method: str | None = None,
    refresh_method: str = DEFAULT_REFRESH_METHOD,
    qr_iterations: int | None = None,
    refresh_tol: jax.typing.ArrayLike = DEFAULT_REFRESH_TOL,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    grafting: str = "frobenius",
    grafting_eps: jax.typing.ArrayLike | None = None,
    grafting_beta2: jax.typing.ArrayLike | None = None,
    grafting_per_block: bool | None = None,
    start_preconditioning_step: int | None = None,
    filter_beta: jax.typing.ArrayLike | None = None,
    filter_bias_correction: bool = True,
    combine: str = "shampoo",
    store_root: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with 4-bit Shampoo, grafted to the gradient norm.

  Each parameter is viewed as a matrix :math:`G \\in \\mathbb{R}^{m\\times n}`
  (see :mod:`optax_shampoo4.partition`), cut into blocks of at most
  ``max_order``; every block has Kronecker factors :math:`L` (m×m) and
  :math:`R` (n×n). At step :math:`t` (from 1):

  .. math::

    t \\equiv 0 \\ (T_1):&\\quad L \\leftarrow \\beta L + (1-\\beta) G G^\\top,
      \\quad R \\leftarrow \\beta R + (1-\\beta) G^\\top G \\\\
    t \\equiv 0 \\ (T_2):&\\quad \\hat L = (L + \\epsilon\\lambda_{\\max}(L) I)^{-1/4},
      \\quad \\hat R = (R + \\epsilon\\lambda_{\\max}(R) I)^{-1/4} \\\\
    \\text{every step}:&\\quad \\hat G = \\hat L G \\hat R, \\qquad
      \\tilde G = \\hat G \\, \\|G\\|_F / (\\|\\hat G\\|_F + 10^{-12})

  with both norms over the whole parameter (the default ``grafting="frobenius"``;
  other grafted methods, per-block norms, a filtered gradient ``X`` in place
  of ``G`` and a grafting-only warm-up are options, see
  :mod:`optax_shampoo4.grafting`). In the ``"eigen"`` format (the
  paper's method) :math:`L` is kept as float32 eigenvalues plus 4-bit
  eigenvectors, refreshed after Björck rectification by ``refresh_method``
  (the paper: one warm-started QR step), and :math:`\\hat L` as a float32 diagonal plus a 4-bit
  off-diagonal. Until the first root update (step ``root_every``) the roots
  are the identity, so the output equals the gradient. Statistics, roots and
  the preconditioning run in float32; the output has the gradient's dtype.

  Failure policy (no Python exceptions under ``jit``): a step whose gradient
  holds a NaN or Inf in any leaf returns an all-zero update and does not touch
  the statistics (counted in ``nonfinite_steps`` / ``skipped_stats``); a
  factor whose refreshed statistic or root is not finite keeps its previous
  value (counted in ``failed_refreshes``).

  Shape-fixing options default to None (their real default is in the
  argument list below), so ``optax.inject_hyperparams(...)`` needs no
  ``static_args``; ``stats_every``, ``root_every`` and
  ``start_preconditioning_step`` may be injected (traced) integers.

  Args:
    max_order: largest factor order (None: 1024); larger dimensions are split
      into blocks.
    beta: EMA decay of the statistics, in [0, 1) (may be injected).
    epsilon: relative damping ε ≥ 0; roots use :math:`\\epsilon\\lambda_{\\max}`
      (may be injected). Also the initial statistic :math:`\\epsilon I`.
    stats_every: :math:`T_1`, steps between statistics updates (may be injected).
    root_every: :math:`T_2`, steps between inverse-root updates (may be injected).
    state_format: ``"eigen"`` (quantized eigenvectors, the paper's method),
      ``"naive"`` (quantized statistic and root, off-diagonals only) or
      ``"fp32"`` (dense float32, the paper's 32-bit baseline).
    bits: bits per quantized element: 4, 8, or 3 (eight codes packed in
      three bytes); None: 4.
    mapping: codebook, ``"linear2"``, ``"dynamic_tree"`` or ``"linear"``.
    quant_block: elements per absmax scale, along one matrix row; any int
      >= 2, even for 4 bits (see :func:`quantization.validate_block`); None: 64.
    min_quant_order: factors of smaller order are kept in float32 (None: 64).
    bjorck_steps: ``(t1, t2)`` Björck iterations before the statistics update
      and before the root; applied to quantized eigenvectors only.
    root_method: ``"eigen"`` (from the stored eigenpairs, paper Alg. 2),
      ``"newton"`` (coupled Newton, Alg. 4) or ``"jorge"`` (Jorge: the
      inverse roots themselves follow the statistics at every statistics
      update by a matmul-only binomial step, see
      :func:`~optax_shampoo4.roots.jorge_root_update`; no statistic is
      stored, no decomposition or Newton loop runs; formats ``"naive"``
      (4-bit root) and ``"fp32"``; the Gram matrices are damped by
      ``epsilon``). None picks ``"eigen"`` for the ``"eigen"`` format and
      ``"newton"`` for the others (which store no eigenvectors).
    refresh_method: how the ``"eigen"`` format's eigenbasis follows the
      statistic at each statistics update, with :math:`A` the updated
      statistic and :math:`V` the stored basis: ``"qr"`` (the paper:
      ``qr_iterations`` warm-started steps :math:`P \\leftarrow
      \\mathrm{qr}(AP).Q` from :math:`V`, :math:`\\lambda =
      \\mathrm{diag}(P^\\top A P)`), ``"eigh"`` (exact eigendecomposition
      of :math:`A`) or ``"adaptive"`` (with :math:`B = V^\\top A V`: exact
      eigendecomposition where :math:`\\|B - \\mathrm{Diag}\\,B\\|_F >`
      ``refresh_tol`` :math:`\\cdot \\|B\\|_F`, else keep :math:`V` and
      take :math:`\\lambda = \\mathrm{diag}\\,B`). Eigenpairs are stored
      in descending order. See :class:`~optax_shampoo4.factors.FactorConfig`.
    qr_iterations: QR steps per statistics update for ``"qr"`` (static; None
      means 1, the paper).
    refresh_tol: relative off-diagonal tolerance τ of ``"adaptive"``, in
      [0, 1] (may be injected); 0 decomposes at every update.
    mesh: optional device mesh. Each bucket's factor axis is then padded to a
      multiple of ``mesh.shape[mesh_axis]`` and the refreshes run under
      ``jax.shard_map``, each device on its share of the factors; place the
      state with :func:`~optax_shampoo4.state_sharding`. Results do not
      depend on the mesh.
    mesh_axis: the mesh axis the factors are split over.
    grafting: the grafted method whose norm the Shampoo direction takes:
      ``"frobenius"`` (the paper: the norm of ``G`` per tensor), or Distributed
      Shampoo's ``"sgd"``, ``"adagrad"``, ``"rmsprop"``, ``"adam"``.
    grafting_eps: :math:`\\epsilon_g` of the adaptive grafted methods (None: 1e-10).
    grafting_beta2: :math:`\\beta_2` of ``"rmsprop"`` (None: 0.99) and
      ``"adam"`` (None: 0.999).
    grafting_per_block: norms per preconditioned block instead of per
      tensor; None means per tensor for ``"frobenius"``, per block otherwise.
    start_preconditioning_step: before this step (counting from 1) the output
      is the grafted method's direction alone; the roots are also refreshed at
      this step. None: from the first step (roots are the identity until the
      first refresh). May be injected.
    filter_beta: None, or the decay :math:`\\beta_1` of an EMA of the gradient
      that is preconditioned (and grafted) in place of the gradient:
      Distributed Shampoo's filtered gradient. The statistics and the grafting
      accumulators always see the raw gradient.
    filter_bias_correction: divide the filtered gradient by :math:`1 - \\beta_1^t`.
    combine: how the two roots act on a block: ``"shampoo"``
      (:math:`\\hat L G \\hat R`) or ``"caspr"`` (Duvvuri et al., ICLR 2024:
      :math:`J = \\hat L G + G \\hat R`, :math:`\\hat G = \\hat L J + J \\hat R`,
      i.e. :math:`\\hat L^2 G + 2 \\hat L G \\hat R + G \\hat R^2`), then the same
      grafting. CASPR needs whole left roots, so with ``mesh=`` its products
      are not split over the devices (each device computes all of them).
    store_root: keep the inverse roots in the state (the paper). False (the
      ``"eigen"`` format with ``root_method="eigen"`` only) stores no root:
      at every step :math:`\\hat L = V (\\Lambda + \\epsilon\\lambda_{\\max} I)^{-1/4} V^\\top`
      is formed from the stored eigenpairs (after ``bjorck_steps[1]`` Björck
      iterations), which halves the preconditioner's memory and costs those
      products at every step; the roots then follow the latest statistics
      (``root_every`` has no effect).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; chain a first-order
    transform (e.g. ``optax.scale_by_adam()``) and a learning rate after it.

  Example:
    >>> import jax.numpy as jnp, optax, optax_shampoo4 as s4
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = optax.chain(s4.scale_by_shampoo4(stats_every=1, root_every=1),
    ...                  optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape, updates["w"].dtype
    ((4, 3), dtype('float32'))

  References:
    Wang et al., `4-bit Shampoo for Memory-Efficient Network Training
    <https://arxiv.org/abs/2405.18144>`_, NeurIPS 2024.
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, ICML 2018.
  """
  max_order = validation.static_int("max_order", max_order, DEFAULT_MAX_ORDER, 1)
  bits = validation.static_int("bits", bits, DEFAULT_BITS, 1)
  quant_block = validation.static_int("quant_block", quant_block, DEFAULT_QUANT_BLOCK, 2)
  min_quant_order = validation.static_int("min_quant_order", min_quant_order, DEFAULT_MIN_QUANT_ORDER, 1)
  root_method = _validate(max_order, beta, epsilon, stats_every, root_every, state_format,
                          bits, mapping, quant_block, min_quant_order, bjorck_steps,
                          root_method)
  qr_iterations = _validate_refresh(refresh_method, qr_iterations, refresh_tol)
  if combine not in COMBINES:
    raise ValueError(f"combine must be one of {COMBINES}, got combine={combine!r}")
  if not isinstance(store_root, (bool, np.bool_)):
    raise TypeError(f"store_root must be a bool, got store_root={store_root!r}")
  if not store_root and (state_format != "eigen" or root_method != "eigen"):
    raise ValueError(
        "store_root=False forms the roots from stored eigenvectors: it needs state_format='eigen' and "
        f"root_method='eigen' (or None), got state_format={state_format!r}, root_method={root_method!r}")
  graft_config = grafting_lib.resolve(grafting, grafting_eps, grafting_beta2, grafting_per_block,
                                      filter_beta, filter_bias_correction)
  start = start_preconditioning_step
  if start is not None:
    validation.check_traceable_int("start_preconditioning_step", start, 0)
  sharding.validate_mesh(mesh, mesh_axis)
  config = fct.FactorConfig(state_format, bits, mapping, quant_block,
                            tuple(int(s) for s in bjorck_steps), root_method,
                            refresh_method=refresh_method, qr_iterations=qr_iterations,
                            refresh_tol=refresh_tol, jorge_damping=epsilon)
  factor_engine = engine.FactorEngine(config, max_order, min_quant_order, mesh, mesh_axis)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    graft_state = graft_config.init(params)
    if optax_compat.is_params_placeholder(params):
      # optax.tree.map_params: parameter-shaped parts come back as the placeholder, the factor
      # buckets (sized from shapes the placeholder hides) as one opaque non-params leaf.
      return ScaleByShampoo4State(zero, optax_compat.NON_PARAMS, zero, zero, zero, graft_state)
    _check_leaf_dtypes(params)
    buckets = factor_engine.init_buckets(factor_engine.plan(params), epsilon, with_root=bool(store_root))
    return ScaleByShampoo4State(zero, buckets, zero, zero, zero, graft_state)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    plan = factor_engine.plan(updates)
    count = optax.safe_increment(state.count)
    matrices = engine.matrix_views(leaves, plan)
    grads_finite = engine.all_finite(leaves)
    stats_due = _every(count, stats_every)
    beta32, epsilon32 = jnp.asarray(beta, jnp.float32), jnp.asarray(epsilon, jnp.float32)

    buckets, stats_failures = lax.cond(
        stats_due & grads_finite,
        lambda b: factor_engine.refresh_stats(b, plan, matrices, beta32)[:2],
        engine.no_refresh, state.factors)
    root_due = _every(count, root_every)
    if start is not None:
      root_due |= count == start
    if store_root:
      buckets, root_failures = lax.cond(
          root_due,
          lambda b: factor_engine.refresh_roots(b, epsilon32, plan),
          engine.no_refresh, buckets)
    else:
      root_failures = jnp.zeros([], jnp.int32)
    # The state keeps its split layout; only the copies below are gathered.
    buckets = factor_engine.keep_split(buckets)

    if store_root:
      # Gather the roots still quantized (a quarter of the fp32 bytes at 8 bits, an eighth at 4); with a
      # mesh each device dequantizes and applies only its share of them (FactorEngine.apply_blocks).
      roots = {name: factor_engine.gathered(bucket.root) for name, bucket in buckets.items()}
    else:
      roots = factor_engine.roots_from_eigenbases(buckets, epsilon32)
    graft_state, filtered = graft_config.update(state.grafting, leaves, count, ~grads_finite, treedef)
    grafted = graft_config.directions(graft_state, filtered, count, treedef)
    filtered_views = engine.matrix_views(filtered, plan)
    if combine == "caspr":  # needs whole left roots: not split into row chunks over a mesh
      dense = {name: fct.load(root) for name, root in roots.items()}
      preconditioned = [
          engine.map_blocks(m, lp, lambda block, b: _caspr(dense[b.left.bucket.name][b.left.index], block,
                                                           dense[b.right.bucket.name][b.right.index]))
          if lp.preconditioned else None for m, lp in zip(filtered_views, plan.leaves)]
    else:
      preconditioned = factor_engine.apply_blocks(plan, filtered_views, roots, _left_right)
    outputs = []
    for leaf, direction, shampoo, lp in zip(leaves, grafted, preconditioned, plan.leaves):
      # Leaves Shampoo does not precondition take the grafted method's direction.
      if lp.preconditioned:
        shampoo = _graft(shampoo, direction.reshape(lp.matrix_shape), lp, graft_config.per_block)
        shampoo = shampoo.reshape(leaf.shape)
        direction = shampoo if start is None else jnp.where(count < start, direction, shampoo)
      outputs.append(jnp.where(grads_finite, direction.astype(leaf.dtype), jnp.zeros_like(leaf)))
    new_state = ScaleByShampoo4State(
        count=count,
        factors=buckets,
        nonfinite_steps=state.nonfinite_steps + (~grads_finite).astype(jnp.int32),
        skipped_stats=state.skipped_stats + (stats_due & ~grads_finite).astype(jnp.int32),
        failed_refreshes=state.failed_refreshes + stats_failures + root_failures,
        grafting=graft_state,
    )
    return jax.tree.unflatten(treedef, outputs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _every(count: jax.Array, period: Any) -> jax.Array:
  """Whether ``count`` is a multiple of ``period`` (a Python int or an injected, traced one)."""
  return count % jnp.asarray(period, jnp.int32) == 0


def _left_right(left_root: jax.Array, block: jax.Array, right_root: jax.Array) -> jax.Array:
  """``L̂ G R̂`` of one block (rows of it, given rows of ``L̂``)."""
  return linalg.matmul(linalg.matmul(left_root, block), right_root)


def _caspr(left_root: jax.Array, block: jax.Array, right_root: jax.Array) -> jax.Array:
  """CASPR's combination of one block: ``J = L̂G + GR̂``, ``L̂J + JR̂``."""
  j = linalg.matmul(left_root, block) + linalg.matmul(block, right_root)
  return linalg.matmul(left_root, j) + linalg.matmul(j, right_root)


def _graft(preconditioned, grafted, leaf_plan: partition.LeafPlan, per_block: bool) -> jax.Array:
  """``preconditioned`` (a matrix view) rescaled to the norm of the grafted direction.

  The norms are over the whole matrix, or over each block when ``per_block``.
  """
  if per_block:
    def grafted_block(block, b):
      return grafting_lib.graft(block, grafted[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]])
    return engine.map_blocks(preconditioned, leaf_plan, grafted_block)
  return grafting_lib.graft(preconditioned, grafted)


def _precondition(matrix, grafted, leaf_plan: partition.LeafPlan, roots, per_block: bool) -> jax.Array:
  """``L̂ X R̂`` per block of a matrix view from dequantized ``roots``, grafted (one device, no mesh).

  The norms are over the whole matrix, or over each block when ``per_block``.
  """

  def left_right(block, b):
    return _left_right(roots[b.left.bucket.name][b.left.index], block, roots[b.right.bucket.name][b.right.index])

  return _graft(engine.map_blocks(matrix, leaf_plan, left_right), grafted, leaf_plan, per_block)
