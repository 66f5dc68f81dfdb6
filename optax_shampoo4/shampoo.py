r"""``scale_by_shampoo4``: the 4-bit Shampoo gradient transformation.

The factory resolves its options once (:class:`~optax_shampoo4.options.ShampooOptions`)
and returns :func:`init` / :func:`update` bound to them and to a
:class:`~optax_shampoo4.engine.FactorEngine`; each step is a few module-level
functions: :func:`refresh` (statistics every :math:`T_1` steps, roots every
:math:`T_2`), :func:`~optax_shampoo4.preconditioning.precondition_blocks` (:math:`\hat L X \hat R` or CASPR's
combination, split over the mesh by the engine) and :func:`~optax_shampoo4.preconditioning.graft_outputs`, the last two in
:mod:`optax_shampoo4.preconditioning`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_shampoo4 import engine, optax_compat, options, preconditioning
from optax_shampoo4 import factors as fct
from optax_shampoo4 import grafting as grafting_lib


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


def scale_by_shampoo4(
    max_order: int | None = None,
    beta: jax.typing.ArrayLike = 0.95,
    epsilon: jax.typing.ArrayLike = 1e-6,
    stats_every: int = 100,
    root_every: int = 500,
    state_format: options.StateFormat = "eigen",
    bits: int | None = None,
    mapping: options.Mapping = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] = (1, 4),
    root_method: options.RootMethod | None = None,
    refresh_method: options.RefreshMethod = options.DEFAULT_REFRESH_METHOD,
    qr_iterations: int | None = None,
    refresh_tol: jax.typing.ArrayLike = options.DEFAULT_REFRESH_TOL,
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    grafting: options.GraftingType = "frobenius",
    grafting_eps: jax.typing.ArrayLike | None = None,
    grafting_beta2: jax.typing.ArrayLike | None = None,
    grafting_per_block: bool | None = None,
    start_preconditioning_step: int | None = None,
    filter_beta: jax.typing.ArrayLike | None = None,
    filter_bias_correction: bool = True,
    combine: options.Combine = "shampoo",
    store_root: options.StoreRoot = True,
    epsilon_mode: options.EpsilonMode = "relative",
    stats_bias_correction: bool = False,
    precondition_1d: bool = False,
    precision: options.Precision = options.DEFAULT_PRECISION,
    quant_damping: jax.typing.ArrayLike = 0.0,
    head_fraction: float | None = None,
    head_bits: int | None = None,
    tail_rectify: options.ShampooTailRectify = options.DEFAULT_TAIL_RECTIFY,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients with 4-bit Shampoo, grafted to the gradient norm.

  Each parameter is viewed as a matrix :math:`G \in \mathbb{R}^{m\times n}`
  (see :mod:`optax_shampoo4.partition`), cut into blocks of at most
  ``max_order``; every block has Kronecker factors :math:`L` (m×m) and
  :math:`R` (n×n). At step :math:`t` (from 1):

  .. math::

    t \equiv 0 \ (T_1):&\quad L \leftarrow \beta L + (1-\beta) G G^\top,
      \quad R \leftarrow \beta R + (1-\beta) G^\top G \\
    t \equiv 0 \ (T_2):&\quad \hat L = (L + \epsilon\lambda_{\max}(L) I)^{-1/4},
      \quad \hat R = (R + \epsilon\lambda_{\max}(R) I)^{-1/4} \\
    \text{every step}:&\quad \hat G = \hat L G \hat R, \qquad
      \tilde G = \hat G \, \|G\|_F / (\|\hat G\|_F + 10^{-12})

  with both norms over the whole parameter (the default ``grafting="frobenius"``;
  other grafted methods, per-block norms, a filtered gradient ``X`` in place
  of ``G`` and a grafting-only warm-up are options, see
  :mod:`optax_shampoo4.grafting`). In the ``"eigen"`` format (the
  paper's method) :math:`L` is kept as float32 eigenvalues plus 4-bit
  eigenvectors, refreshed after Björck rectification by ``refresh_method``
  (the paper: one warm-started QR step), and :math:`\hat L` as a float32 diagonal plus a 4-bit
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
    beta: EMA decay of the statistics, in [0, 1]; 1 sums the Gram matrices
      (AdaGrad, Distributed Shampoo's default) (may be injected).
    epsilon: relative damping ε ≥ 0; roots use :math:`\epsilon\lambda_{\max}`
      (may be injected). Also the initial statistic :math:`\epsilon I`.
    stats_every: :math:`T_1`, steps between statistics updates (may be injected).
    root_every: :math:`T_2`, steps between inverse-root updates (may be injected).
    state_format: how each factor is stored: ``"eigen"`` (float32
      eigenvalues plus quantized eigenvectors, the paper's method),
      ``"naive"`` (quantized statistic and root, off-diagonals only) or
      ``"fp32"`` (dense float32 statistic and root,
      :class:`~optax_shampoo4.MatrixFactors`, the paper's 32-bit baseline;
      unlike SOAP's ``"fp32"``, which keeps float32 *eigenvectors*).
    bits: bits per quantized element: 4, 8, or 3 (eight codes packed in
      three bytes); None: 4.
    mapping: codebook, ``"linear2"``, ``"dynamic_tree"`` or ``"linear"``.
    quant_block: elements per absmax scale, along one matrix row; any int
      >= 2, even for 4 bits (see :func:`quantization.validate_block`); None: 64.
    min_quant_order: factors of smaller order are kept in float32 (None: 64).
    bjorck_steps: ``(t1, t2)`` Björck iterations before the statistics update
      and before the root; applied to quantized eigenvectors only.
    root_method: how the inverse roots are computed (a different choice
      from the *storage* ``state_format``, though both have an ``"eigen"``):
      ``"eigen"`` (from the stored eigenpairs, paper Alg. 2; needs
      ``state_format="eigen"``),
      ``"newton"`` (coupled Newton, Alg. 4) or ``"jorge"`` (Jorge: the
      inverse roots themselves follow the statistics at every statistics
      update by a matmul-only binomial step, see
      :func:`~optax_shampoo4.roots.jorge_root_update`; no statistic is
      stored, no decomposition or Newton loop runs; formats ``"naive"``
      (4-bit root) and ``"fp32"``; the Gram matrices are damped by
      ``epsilon``) or ``"eigh"`` (formats ``"naive"`` and ``"fp32"``: an
      exact eigendecomposition of the statistic, Distributed Shampoo's root).
      None picks ``"eigen"`` for the ``"eigen"`` format and ``"newton"`` for
      the others (which store no eigenvectors), ``"eigh"`` with
      ``epsilon_mode="absolute"`` (Newton stalls on a near-singular statistic).
    refresh_method: how the ``"eigen"`` format's eigenbasis follows the
      statistic at each statistics update, with :math:`A` the updated
      statistic and :math:`V` the stored basis: ``"qr"`` (the paper:
      ``qr_iterations`` warm-started steps :math:`P \leftarrow
      \mathrm{qr}(AP).Q` from :math:`V`, :math:`\lambda =
      \mathrm{diag}(P^\top A P)`), ``"eigh"`` (exact eigendecomposition
      of :math:`A`) or ``"adaptive"`` (with :math:`B = V^\top A V`: exact
      eigendecomposition where :math:`\|B - \mathrm{Diag}\,B\|_F >`
      ``refresh_tol`` :math:`\cdot \|B\|_F`, else keep :math:`V` and
      take :math:`\lambda = \mathrm{diag}\,B`). Eigenpairs are stored
      in descending order. See :class:`~optax_shampoo4.factor_state.FactorConfig`.
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
    grafting_eps: :math:`\epsilon_g` of the adaptive grafted methods (None: 1e-10).
    grafting_beta2: :math:`\beta_2` of ``"rmsprop"`` (None: 0.99) and
      ``"adam"`` (None: 0.999).
    grafting_per_block: norms per preconditioned block instead of per
      tensor; None means per tensor for ``"frobenius"``, per block otherwise.
    start_preconditioning_step: before this step (counting from 1) the output
      is the grafted method's direction alone; the roots are also refreshed at
      this step. None: from the first step (roots are the identity until the
      first refresh). May be injected.
    filter_beta: None, or the decay :math:`\beta_1` of an EMA of the gradient
      that is preconditioned (and grafted) in place of the gradient:
      Distributed Shampoo's filtered gradient. The statistics and the grafting
      accumulators always see the raw gradient.
    filter_bias_correction: divide the filtered gradient by :math:`1 - \beta_1^t`.
    combine: how the two roots act on a block: ``"shampoo"``
      (:math:`\hat L G \hat R`) or ``"caspr"`` (Duvvuri et al., ICLR 2024:
      :math:`J = \hat L G + G \hat R`, :math:`\hat G = \hat L J + J \hat R`,
      i.e. :math:`\hat L^2 G + 2 \hat L G \hat R + G \hat R^2`), then the same
      grafting. CASPR needs whole left roots, so with ``mesh=`` its products
      are not split over the devices (each device computes all of them).
    store_root: keep the inverse roots in the state (the paper). False (the
      ``"eigen"`` format with ``root_method="eigen"`` only) stores no root:
      at every step :math:`\hat L = V (\Lambda + \epsilon\lambda_{\max} I)^{-1/4} V^\top`
      is applied from the stored eigenpairs (after ``bjorck_steps[1]`` Björck
      iterations) as :math:`W (W^\top G)`, :math:`W = V (\Lambda + \dots)^{-1/8}`
      (:math:`2n^2 m` multiply-adds for an ``n×m`` block, not the :math:`n^3`
      of forming :math:`\hat L`), which halves the preconditioner's memory and
      costs those products at every step; the roots then follow the latest statistics
      (``root_every`` has no effect). ``"eigvals"`` also stores no root
      matrix but keeps, per factor, the eigenvalues :math:`\Lambda_r` as of
      the last root update (every ``root_every`` steps, one float32 vector):
      the roots applied at every step are
      :math:`V (\Lambda_r + \epsilon\max\lambda_r I)^{-1/4} V^\top` with the
      current basis :math:`V`, so the spectrum they apply changes on the
      stored root's schedule (measured: ``benchmarks/shampoo4_root_eigvals.py``).
    epsilon_mode: ``"relative"`` (the paper: roots of :math:`A +
      \epsilon\lambda_{\max}(A) I`, statistics start at :math:`\epsilon I`)
      or ``"absolute"`` (Distributed Shampoo: roots of :math:`A + \epsilon I`,
      statistics start at zero; the ``"eigen"`` format then starts from
      eigenvalues 0 and the identity basis).
    stats_bias_correction: with ``epsilon_mode="absolute"`` and
      :math:`\beta < 1`, roots of :math:`A / c_k + \epsilon I` with
      :math:`c_k = 1 - \beta^k` after :math:`k` statistics updates
      (:math:`k = \lfloor t / T_1 \rfloor`; Distributed Shampoo's bias
      correction of zero-initialized factors). Computed as
      :math:`c_k^{1/4} (A + c_k\epsilon I)^{-1/4}` without the scalar
      :math:`c_k^{1/4}`, which the grafting removes. No effect with relative
      damping (it scales with :math:`A`) or :math:`\beta = 1` (a sum).
    precondition_1d: vectors (leaves with one dimension above 1) get one
      :math:`n \times n` factor per block of at most ``max_order`` and the
      direction :math:`(L + \epsilon I)^{-1/2} x` (the left root applied
      twice), as Distributed Shampoo; False (the paper) passes them through
      with the grafted method's direction.
    precision: of the every-step products only (:math:`\hat L G \hat R`,
      CASPR's, the ``store_root=False`` root formation), see
      :func:`~optax_shampoo4.linalg.step_matmul`: ``"highest"`` (float32
      operands, full precision), ``"high"`` (bf16×3, about float32's accuracy
      in three bf16 passes) or ``"default"`` (bfloat16 operands, float32
      accumulation: one pass, the fast path of GPUs and TPUs). Statistics,
      decompositions, Björck and roots always run at full float32 precision.
      Quality at each setting: ``benchmarks/precision.py``.
    quant_damping: :math:`\delta \ge 0`, extra damping of the ``"eigen"``
      format's roots relative to the largest eigenvalue:
      :math:`V (\Lambda + \epsilon' + \delta\lambda_{\max} I)^{-1/4} V^\top`
      with :math:`\epsilon'` the damping above (``root_method="eigen"`` only;
      ignored by ``"fp32"`` and ``"naive"``). A floor under the eigenvalues
      of a quantized basis for small absolute ε (default 0; may be injected).
    head_fraction: with the quantized ``"eigen"`` format, the fraction of each
      factor's eigenvectors with the largest eigenvalues (the first
      :math:`\lceil n f \rceil` rows) stored in ``head_bits`` bits instead of
      ``bits`` (:class:`~optax_shampoo4.quantization.SplitRowsQuantized`); None or 0
      (the paper) stores every row in ``bits``. Each statistics update
      re-encodes :math:`V\Lambda V^\top` through the stored basis, and a
      rounding error :math:`\delta` of the rows of :math:`\lambda_{\max}`
      puts about :math:`\delta\lambda_{\max}` into the directions of the
      smallest eigenvalues, which the inverse root weights most; precise
      head rows keep that leak small. With ``bits=8``, ``head_fraction=1/16``
      and ``head_bits=16`` the basis costs one byte per element plus
      1/16, about the paper layout's basis and root together.
    head_bits: bits of the head rows, 16 (uniform codes; the default) or 8;
      more than ``bits``.
    tail_rectify: how a statistics update rectifies the decoded rows after a
      head: ``"bjorck"`` (``bjorck_steps[0]`` Björck steps, head first) or
      ``"qr"`` (Gram–Schmidt in descending-eigenvalue order, exactly
      orthonormal); roots are formed after ``bjorck_steps[1]`` Björck steps
      tier by tier either way.

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
  opts = options.ShampooOptions.from_kwargs(
      max_order=max_order, beta=beta, epsilon=epsilon, stats_every=stats_every, root_every=root_every,
      state_format=state_format, bits=bits, mapping=mapping, quant_block=quant_block,
      min_quant_order=min_quant_order, bjorck_steps=bjorck_steps, root_method=root_method,
      refresh_method=refresh_method, qr_iterations=qr_iterations, refresh_tol=refresh_tol, mesh=mesh,
      mesh_axis=mesh_axis, grafting=grafting, grafting_eps=grafting_eps, grafting_beta2=grafting_beta2,
      grafting_per_block=grafting_per_block, start_preconditioning_step=start_preconditioning_step,
      filter_beta=filter_beta, filter_bias_correction=filter_bias_correction, combine=combine,
      store_root=store_root, epsilon_mode=epsilon_mode, stats_bias_correction=stats_bias_correction,
      precondition_1d=precondition_1d, precision=precision, quant_damping=quant_damping,
      head_fraction=head_fraction, head_bits=head_bits, tail_rectify=tail_rectify)
  factor_engine = make_engine(opts)
  return optax_compat.gradient_transformation(functools.partial(init, opts, factor_engine),
                                              functools.partial(update, opts, factor_engine))


def make_engine(opts: options.ShampooOptions) -> engine.FactorEngine:
  """The factor engine of resolved Shampoo options."""
  return engine.FactorEngine(opts.factor_config(), opts.max_order, opts.min_quant_order, opts.mesh,
                             opts.mesh_axis, precondition_1d=opts.precondition_1d)


def init(opts: options.ShampooOptions, factor_engine: engine.FactorEngine, params: Any) -> ScaleByShampoo4State:
  r"""The initial state: statistics :math:`\epsilon I` (zero with absolute ε), roots :math:`I`, zero counters."""
  zero = jnp.zeros([], jnp.int32)
  graft_state = opts.grafting.init(params)
  initial = 0.0 if opts.epsilon_mode == "absolute" else opts.epsilon
  buckets = factor_engine.init_factors(params, initial, "scale_by_shampoo4", with_root=opts.store_root is True)
  if opts.store_root == options.STORE_ROOT_EIGVALS and isinstance(buckets, dict):
    buckets = {name: keep_root_eigvals(bucket) for name, bucket in buckets.items()}
  return ScaleByShampoo4State(zero, buckets, zero, zero, zero, graft_state)


def update(opts: options.ShampooOptions, factor_engine: engine.FactorEngine, updates: Any,
           state: ScaleByShampoo4State, params: Any = None, **extra_args: Any) -> tuple[Any, ScaleByShampoo4State]:
  """One step: refresh what is due, precondition every block, graft; see :func:`scale_by_shampoo4`."""
  del params, extra_args
  step = factor_engine.start_step(updates, state.count, state.factors)
  stats_due = every(step.count, opts.stats_every)
  buckets, failures = refresh(opts, factor_engine, state.factors, step, stats_due)
  leaves = factor_engine.ordered_after(step.leaves, failures)  # after the refreshes (failures: their count)
  graft_state, filtered = opts.grafting.update(state.grafting, leaves, step.count, ~step.grads_finite, step.treedef)
  grafted = opts.grafting.directions(graft_state, filtered, step.count, step.treedef)
  preconditioned = preconditioning.precondition_blocks(
      opts, factor_engine, buckets, step.plan, engine.matrix_views(filtered, step.plan), root_epsilon(opts, step.count))
  outputs = preconditioning.graft_outputs(opts, step, grafted, preconditioned)
  new_state = ScaleByShampoo4State(count=step.count, factors=buckets, grafting=graft_state,
                                   **engine.failure_counts(state, step.grads_finite, stats_due, failures))
  return jax.tree.unflatten(step.treedef, outputs), new_state


def refresh(opts: options.ShampooOptions, factor_engine: engine.FactorEngine, buckets: engine.Buckets,
            step: engine.Step, stats_due: jax.Array) -> tuple[engine.Buckets, jax.Array]:
  """Statistics (when due and the gradient is finite), then roots (when due); ``(buckets, failures)``.

  The returned buckets keep the state's split layout over the mesh.
  """
  beta = jnp.asarray(opts.beta, jnp.float32)
  epsilon = root_epsilon(opts, step.count)
  buckets, stats_failures = lax.cond(
      stats_due & step.grads_finite,
      lambda b: factor_engine.refresh_stats(b, step.plan, step.matrices, beta)[:2],
      engine.no_refresh, buckets)
  root_due = every(step.count, opts.root_every)
  if opts.start_preconditioning_step is not None:
    root_due |= step.count == opts.start_preconditioning_step
  if opts.store_root is not False:
    buckets, root_failures = lax.cond(
        root_due, lambda b: factor_engine.refresh_roots(b, epsilon, step.plan), engine.no_refresh, buckets)
  else:
    root_failures = jnp.zeros([], jnp.int32)
  return factor_engine.keep_split(buckets), stats_failures + root_failures


def keep_root_eigvals(bucket: fct.Bucket) -> fct.Bucket:
  """An ``"eigen"`` bucket that keeps its roots as eigenvalues (``store_root="eigvals"``), from its current ones."""
  if isinstance(bucket, fct.EigenFactors):
    return bucket._replace(root=None, root_eigvals=bucket.eigvals)
  return bucket


def root_epsilon(opts: options.ShampooOptions, count: jax.Array) -> jax.Array:
  r"""The ε the roots are damped with at step ``count``: ``epsilon``, times :math:`c_k = 1-\beta^k`
  with statistics bias correction (see ``stats_bias_correction`` of :func:`scale_by_shampoo4`)."""
  epsilon = jnp.asarray(opts.epsilon, jnp.float32)
  if not (opts.stats_bias_correction and opts.epsilon_mode == "absolute"):
    return epsilon
  beta = jnp.asarray(opts.beta, jnp.float32)
  folds = count // jnp.asarray(opts.stats_every, jnp.int32)
  correction = jnp.where((beta < 1.0) & (folds > 0), 1.0 - beta ** folds.astype(jnp.float32), 1.0)
  return epsilon * correction


def every(count: jax.Array, period: Any) -> jax.Array:
  """Whether ``count`` is a multiple of ``period`` (a Python int or an injected, traced one)."""
  return count % jnp.asarray(period, jnp.int32) == 0
