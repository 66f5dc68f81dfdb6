"""``scale_by_soap4``: SOAP (Adam in Shampoo's eigenbasis) with a 4-bit eigenbasis.

SOAP runs Adam in the eigenbasis of Shampoo's Kronecker factors. Its
statistic in the ``"eigen"`` format of :mod:`optax_shampoo4.factors` — float32
eigenvalues plus 4-bit eigenvectors — is exactly the pair ``(L, Q_L)`` SOAP
needs, and SOAP needs no inverse root, so each factor stores one 4-bit matrix.
The factors are the shared engine's (:mod:`optax_shampoo4.engine`): bucketed,
refreshed under ``shard_map`` with a mesh, with the same failure policy as
:func:`~optax_shampoo4.scale_by_shampoo4`.
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_shampoo4 import engine, linalg, moment_storage, optax_compat, partition, sharding, validation
from optax_shampoo4 import factors as fct
from optax_shampoo4 import quantization as qz
from optax_shampoo4.transform import _check_leaf_dtypes

FORMATS = ("eigen", "fp32")
# Resolved defaults of the options that default to None (optax.inject_hyperparams turns every int
# default into an array, so static ints default to None).
DEFAULTS = dict(precondition_every=10, max_order=1024, max_precond_dim=10000, bits=4, quant_block=64,
                min_quant_order=64, head_fraction=1 / 16)


class ScaleBySoap4State(NamedTuple):
  """State of :func:`scale_by_soap4`.

  Attributes:
    count: ``int32[]``, number of ``update`` calls so far.
    factors: ``{bucket name: EigenFactors}`` with ``root=None``: per factor its
      eigenvalues (float32) and eigenvectors (4-bit, or float32 for small
      orders and for ``state_format="fp32"``), stacked by order.
    mu: Adam's first moment, a tree like the parameters (float32; with
      ``moment_bits``, uint8 codes for tensors of at least
      :data:`~optax_shampoo4.moments.MIN_QUANTIZED_SIZE` elements). For a
      preconditioned leaf it holds the moment in the rotated basis
      :math:`Q_L^\\top M Q_R` (block by block), in the leaf's shape.
    nu: Adam's second moment, same layout as ``mu``.
    nonfinite_steps: ``int32[]``, steps whose gradient held a NaN or Inf in any
      leaf (zero update; moments and factors untouched).
    skipped_stats: ``int32[]``, basis refreshes skipped for that reason.
    failed_refreshes: ``int32[]``, factor refreshes rejected as non-finite
      (that factor kept its previous eigenpairs).
  """

  count: jax.Array
  factors: dict[str, fct.Bucket]
  mu: Any
  nu: Any
  nonfinite_steps: jax.Array
  skipped_stats: jax.Array
  failed_refreshes: jax.Array
  mu_scales: Any = None
  nu_scales: Any = None


# (codes or values, scales) -> float32 moment of a leaf; the scales are None for float32 moments.
def _load_moment(stored: jax.Array, scales: Any, shape: tuple[int, ...], bits: int | None, kind: str) -> jax.Array:
  if bits is None:
    return stored
  return moment_storage.load_moment(moment_storage.join_stored(stored, scales, shape, bits, kind))


def _resolve(name: str, value: Any) -> Any:
  return DEFAULTS[name] if value is None else value


def _validate(b1, b2, eps, shampoo_beta, precondition_every, max_order, max_precond_dim, state_format, bits,
              mapping, quant_block, min_quant_order, bjorck_steps, moment_bits, head_fraction) -> None:
  validation.check_range("b1", b1, 0.0, 1.0)
  validation.check_range("b2", b2, 0.0, 1.0)
  validation.check_range("eps", eps, 0.0, math.inf)
  if shampoo_beta is not None:
    validation.check_range("shampoo_beta", shampoo_beta, 0.0, 1.0)
  validation.check_traceable_int("precondition_every", precondition_every, 1)
  validation.check_int("max_order", max_order, 1)
  validation.check_int("max_precond_dim", max_precond_dim, 1)
  validation.check_int("min_quant_order", min_quant_order, 1)
  validation.check_int("quant_block", quant_block, 2)
  moment_storage.check_moment_bits("moment_bits", moment_bits)
  if isinstance(head_fraction, bool) or not isinstance(head_fraction, (int, float, np.integer, np.floating)):
    raise TypeError(f"head_fraction must be a float in [0, 1), got head_fraction={head_fraction!r}")
  validation.check_range("head_fraction", head_fraction, 0.0, 1.0)
  if state_format not in FORMATS:
    raise ValueError(f"state_format must be one of {FORMATS}, got state_format={state_format!r}")
  qz.validate_mapping_bits(mapping, bits)
  if bits == 4 and quant_block % 2:
    raise ValueError(f"quant_block must be even for 4-bit codes, got quant_block={quant_block!r}")
  if (not isinstance(bjorck_steps, (tuple, list)) or len(bjorck_steps) != 2
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in bjorck_steps)):
    raise ValueError(f"bjorck_steps must be a pair of ints >= 0, got bjorck_steps={bjorck_steps!r}")


def soap_factor_config(bits: int, mapping: str, quant_block: int, bjorck_steps: tuple[int, int],
                       head_fraction: float = 0.0) -> fct.FactorConfig:
  """The factor settings of SOAP: the ``"eigen"`` format (new refresh options go here)."""
  # No re-sort after the QR step: SOAP sorts before the QR step (update_stats' row_order), and the
  # refreshed columns must stay aligned with the carried moments' coordinates.
  return fct.FactorConfig("eigen", bits, mapping, quant_block, tuple(int(s) for s in bjorck_steps), "eigen",
                          sort_refreshed=False, head_fraction=float(head_fraction))


def scale_by_soap4(
    b1: jax.typing.ArrayLike = 0.95,
    b2: jax.typing.ArrayLike = 0.95,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    shampoo_beta: jax.typing.ArrayLike | None = None,
    precondition_every: int | None = None,
    max_order: int | None = None,
    max_precond_dim: int | None = None,
    state_format: str = "eigen",
    bits: int | None = None,
    mapping: str = "linear2",
    quant_block: int | None = None,
    min_quant_order: int | None = None,
    bjorck_steps: tuple[int, int] = (1, 1),
    mesh: jax.sharding.Mesh | None = None,
    mesh_axis: str = "data",
    moment_bits: int | None = None,
    project_nu: bool = True,
    head_fraction: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam in the (4-bit) eigenbasis of Shampoo's Kronecker factors (SOAP).

  Each parameter is viewed as a matrix and cut into blocks as in
  :func:`~optax_shampoo4.scale_by_shampoo4`; block :math:`G` (m×n) has factors
  :math:`L \\approx Q_L \\Lambda_L Q_L^\\top` and :math:`R \\approx Q_R
  \\Lambda_R Q_R^\\top`. With :math:`s = t - 1` at call :math:`t`:

  .. math::

    G' = Q_L^\\top G Q_R, \\quad m \\leftarrow \\beta_1 m + (1-\\beta_1) G', \\quad
    v \\leftarrow \\beta_2 v + (1-\\beta_2) G'^2, \\\\
    N = Q_L \\Big(\\frac{\\sqrt{1-\\beta_2^s}}{1-\\beta_1^s}\\,\\frac{m}{\\sqrt v + \\epsilon}\\Big) Q_R^\\top

  (``m``, ``v`` live in the rotated basis). Call 1 only builds the bases and
  returns a zero update (as the reference: the first gradient never
  preconditions itself). At call 1 and every ``precondition_every`` Adam
  steps after it, *after* the step: the gradient's
  :math:`G G^\\top` / :math:`G^\\top G` is folded in and the basis refreshed by
  one warm-started QR step, the eigenpairs sorted by descending eigenvalue
  before it (:func:`~optax_shampoo4.factors.update_stats` with
  ``row_order``, so the refreshed basis comes out sorted and the 8-bit
  head of ``head_fraction`` holds the largest eigenvalues' rows:
  :math:`A = \\beta_s Q\\Lambda Q^\\top + (1-\\beta_s) G G^\\top`,
  :math:`Q \\leftarrow \\mathrm{qr}(A Q)`, :math:`\\lambda = \\mathrm{diag}(Q^\\top A Q)`),
  and ``m`` is re-projected, :math:`m \\leftarrow (Q_L'^\\top Q_L)\\, m\\,
  (Q_R^\\top Q_R')`; ``v`` with the squared change of basis (``project_nu``;
  the reference only permutes it, which a quantized basis makes unstable).

  **Statistic between refreshes.** The reference folds every step's gradient
  into dense float32 statistics; here the statistic *is* the (4-bit)
  eigen-pair, which only a QR refresh can update, and a dense accumulator
  would cost the memory this format saves. So the statistic is folded at
  refresh steps only, from that step's gradient (as 4-bit Shampoo does at
  :math:`T_1`): an EMA over refreshes. ``shampoo_beta`` defaults to ``b2``
  (the reference's default), which keeps the reference's effective sample
  count (about :math:`1/(1-\\beta_s) = 20` gradient outer products) but
  spreads it over ``precondition_every`` times as many steps.

  ``state_format="fp32"`` runs the same algorithm with float32 eigenvectors
  (no quantization, no Björck): the two formats differ only in storage.
  Dimensions above ``max_precond_dim`` are not rotated (identity basis on that
  side); leaves of rank ≤ 1 (after dropping size-1 dimensions) get plain Adam.
  Everything runs in float32; the output has the gradient's dtype.

  Failure policy (no exceptions under ``jit``): a step whose gradient holds a
  NaN or Inf in any leaf returns an all-zero update and leaves moments and
  factors untouched (``nonfinite_steps``, ``skipped_stats``); a factor whose
  refresh is not finite keeps its eigenpairs (``failed_refreshes``).

  Args:
    b1: Adam's first-moment decay, in [0, 1) (may be injected).
    b2: Adam's second-moment decay, in [0, 1) (may be injected).
    eps: added to :math:`\\sqrt v` (may be injected).
    shampoo_beta: EMA decay of the Kronecker statistics per refresh; None
      means ``b2`` (may be injected).
    precondition_every: steps between basis refreshes (None: 10; may be injected).
    max_order: largest factor order; larger dimensions are split into blocks
      (static; None: 1024).
    max_precond_dim: matrix dimensions above this are not rotated (static;
      None: 10000, the reference's value, which leaves vocabularies alone).
    state_format: ``"eigen"`` (quantized eigenvectors) or ``"fp32"``.
    bits: 4 or 8, bits per quantized eigenvector element (None: 4).
    mapping: codebook, ``"linear2"``, ``"dynamic_tree"`` or ``"linear"``.
    quant_block: elements per absmax scale, along one eigenvector (None: 64).
    min_quant_order: factors of smaller order are kept in float32 (None: 64).
    bjorck_steps: ``(t1, t2)`` Björck iterations on the dequantized
      eigenvectors before a refresh and before every step's rotation. With
      an 8-bit head (``head_fraction``) a refresh rectifies head first with
      ``t1`` steps on both parts, and each step only rectifies the head
      (``t2`` steps) and projects it out of the 4-bit rows: their own Björck
      step would cost :math:`2n^3` per factor, most of the step, and is not
      needed (cnn_digits, seeds 0–2, ``benchmarks/soap_basis.py``, before
      the sort moved into the refresh: −1.9 % vs fp32 SOAP without it,
      −4.3 % with it).
    mesh: optional device mesh; the factor axis of each bucket is split over
      ``mesh_axis`` and refreshed under ``jax.shard_map`` (as
      :func:`~optax_shampoo4.scale_by_shampoo4`). Results do not depend on it.
    mesh_axis: the mesh axis the factors are split over.
    project_nu: at a basis refresh, carry ``v`` into the new basis with the
      squared change of basis, :math:`v \\leftarrow (C_L \\circ C_L)\\, v\\,
      (C_R \\circ C_R)^\\top` with :math:`C = Q_{new}^\\top Q_{old}` (the
      second moment of :math:`C g` for independent coordinates). False keeps
      ``v``'s (permuted) entries, as the SOAP reference. With a quantized basis
      the refresh rotates near-degenerate directions (e.g. the null space of
      an early, low-rank statistic) arbitrarily; re-projected ``m`` then lands
      on coordinates whose kept ``v`` is near zero and the step
      :math:`m/\\sqrt v` explodes (measured: cnn_digits, 8-bit basis, loss
      1.4 → 400 after the third refresh). Default True (static).
    moment_bits: None (float32 ``mu``/``nu``), 8 or 4: Adam's moments (in the
      rotated basis) stored with the schemes of :mod:`optax_shampoo4.moments`
      (block-wise codes; 4-bit second moments rank-1 normalized), dequantized,
      updated and re-quantized inside each step (static).
    head_fraction: with 4-bit bases, the fraction of each basis' eigenvectors
      (those of the largest eigenvalues, at least one) stored in 8 bits;
      before use the basis is rectified head first
      (:func:`~optax_shampoo4.linalg.bjorck_head_first`: the 8-bit rows, then
      the 4-bit rows made orthogonal to them). Adam's :math:`v` in a
      coordinate whose basis row is off by a relative error :math:`\\delta`
      picks up about :math:`\\delta^2 \\bar\\lambda` from the dominant
      directions; at 4 bits this swamps the small-eigenvalue coordinates,
      whose steps SOAP exists to enlarge. Keeping the dominant rows precise
      and projecting them out of the rest removes their share of that leak
      (for eigenvalues :math:`\\propto i^{-2}`, order 128: about 95 % of it) for
      about 6 % more factor bytes at the default 1/16 (cnn_digits, seeds
      0–2, ``benchmarks/soap_basis.py``, before the sort moved into the
      refresh: final loss vs fp32 SOAP +52.5 %
      with every row in 4 bits, −1.9 % with the 1/16 head, +39.8 % with the
      same head and symmetric Björck). 0 stores every row in 4 bits
      (static; None: 1/16).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` giving Adam's direction
    (no learning rate, no sign); see :func:`~optax_shampoo4.soap4`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_shampoo4 as s4
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = optax.chain(s4.scale_by_soap4(precondition_every=2), optax.scale_by_learning_rate(3e-3))
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.arange(12.0).reshape(4, 3), "b": jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> float(jnp.abs(updates["w"]).max())  # the first call only builds the bases
    0.0

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, ICLR 2025.
    Wang et al., `4-bit Shampoo for Memory-Efficient Network Training
    <https://arxiv.org/abs/2405.18144>`_, NeurIPS 2024.
  """
  precondition_every = _resolve("precondition_every", precondition_every)
  max_order = _resolve("max_order", max_order)
  max_precond_dim = _resolve("max_precond_dim", max_precond_dim)
  bits = _resolve("bits", bits)
  quant_block = _resolve("quant_block", quant_block)
  min_quant_order = _resolve("min_quant_order", min_quant_order)
  head_fraction = _resolve("head_fraction", head_fraction)
  _validate(b1, b2, eps, shampoo_beta, precondition_every, max_order, max_precond_dim, state_format, bits,
            mapping, quant_block, min_quant_order, bjorck_steps, moment_bits, head_fraction)
  sharding.validate_mesh(mesh, mesh_axis)
  if not isinstance(project_nu, (bool, np.bool_)):
    raise TypeError(f"project_nu must be a bool, got project_nu={project_nu!r}")
  config = soap_factor_config(bits, mapping, quant_block, bjorck_steps, head_fraction)
  # fp32: the same eigen buckets, none quantized.
  quant_from = min_quant_order if state_format == "eigen" else sys.maxsize
  factor_engine = engine.FactorEngine(config, max_order, quant_from, mesh, mesh_axis, max_precond_dim)
  basis_bjorck = config.bjorck_steps[1]

  def bases(buckets):
    """Per bucket, the eigenvectors as rows (Qᵀ), dequantized, rectified and gathered."""
    # With an 8-bit head, each step rectifies the head and projects it out of the 4-bit rows; the 4-bit
    # rows' own Björck (2n³ per factor, most of the step) is not needed (see head_fraction).
    return {name: fct.rectified(factor_engine.gathered(bucket.eigvecs), basis_bjorck, tail_steps=0)
            for name, bucket in buckets.items()}

  def init_fn(params):
    if optax_compat.is_params_placeholder(params):
      # optax.tree.map_params: the moments are parameter-shaped, the factor buckets are not.
      zero = jnp.zeros([], jnp.int32)
      scales = None if moment_bits is None else optax_compat.NON_PARAMS
      return ScaleBySoap4State(zero, optax_compat.NON_PARAMS, params, params, zero, zero, zero, scales, scales)
    _check_leaf_dtypes(params, "scale_by_soap4")
    buckets = factor_engine.init_buckets(factor_engine.plan(params), 0.0, with_root=False)
    zero = jnp.zeros([], jnp.int32)
    if moment_bits is None:
      zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
      return ScaleBySoap4State(zero, buckets, zeros, zeros, zero, zero, zero)
    mu, mu_scales = moment_storage.init_moment_trees(params, moment_bits, "first")
    nu, nu_scales = moment_storage.init_moment_trees(params, moment_bits, "second")
    return ScaleBySoap4State(zero, buckets, mu, nu, zero, zero, zero, mu_scales, nu_scales)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    plan = factor_engine.plan(updates)
    count = optax.safe_increment(state.count)
    matrices = engine.matrix_views(leaves, plan)
    grads_finite = engine.all_finite(leaves)
    b1_, b2_, eps_ = (jnp.asarray(x, jnp.float32) for x in (b1, b2, eps))
    beta_s = b2_ if shampoo_beta is None else jnp.asarray(shampoo_beta, jnp.float32)

    def loaded(stored, scales, kind):
      scales = [None] * len(leaves) if scales is None else treedef.flatten_up_to(scales)
      return [_in_view(_load_moment(x, sc, lp.shape, moment_bits, kind), lp)
              for x, sc, lp in zip(treedef.flatten_up_to(stored), scales, plan.leaves)]

    mu, nu = loaded(state.mu, state.mu_scales, "first"), loaded(state.nu, state.nu_scales, "second")
    rows = bases(state.factors)

    # Adam in the current basis (bases built from earlier gradients only).
    adam_step = count - 1
    stepped = grads_finite & (adam_step > 0)
    s = jnp.maximum(adam_step, 1).astype(jnp.float32)
    step_scale = jnp.sqrt(1.0 - b2_**s) / (1.0 - b1_**s)
    outputs, new_mu, new_nu = [], [], []
    for leaf, matrix, lp, m, v in zip(leaves, matrices, plan.leaves, mu, nu):
      g = _rotate(matrix, lp, rows, forward=True) if lp.preconditioned else leaf.astype(jnp.float32)
      m_next = b1_ * m + (1.0 - b1_) * g
      v_next = b2_ * v + (1.0 - b2_) * g * g
      direction = step_scale * m_next / (jnp.sqrt(v_next) + eps_)
      if lp.preconditioned:
        direction = _rotate(direction, lp, rows, forward=False)
      outputs.append(jnp.where(stepped, direction.reshape(leaf.shape), 0.0).astype(leaf.dtype))
      new_mu.append(jnp.where(stepped, m_next, m))
      new_nu.append(jnp.where(stepped, v_next, v))

    def refresh(operand):
      buckets, mu, nu = operand
      # Sorted by eigenvalue (descending) inside the refresh: the refreshed columns come out sorted, so
      # the 8-bit head holds the largest eigenvalues' rows.
      order = {name: jnp.argsort(-b.eigvals, axis=-1) for name, b in buckets.items()}
      buckets, failures, accepted = factor_engine.refresh_stats(buckets, plan, matrices, beta_s, order)
      if not project_nu:
        # A rejected factor kept its previous eigenpairs, in their previous order.
        kept = {name: jnp.where(accepted[name][:, None], o, jnp.arange(o.shape[-1])) for name, o in order.items()}
        nu = [_permute(v, lp, kept) if lp.preconditioned else v for v, lp in zip(nu, plan.leaves)]
      new_rows = bases(buckets)
      # C = Qₙₑ𝓌ᵀ Q_old per factor (rows are Qᵀ; the sort's permutation included): m is carried into the
      # new basis, m ← C_L m C_Rᵀ; with project_nu, v ← (C_L∘C_L) v (C_R∘C_R)ᵀ.
      change = {name: linalg.matmul(new_rows[name], linalg.transpose(rows[name])) for name in rows}
      mu = [_rotate(m, lp, change, forward=True) if lp.preconditioned else m for m, lp in zip(mu, plan.leaves)]
      if project_nu:
        squared = {name: c * c for name, c in change.items()}
        nu = [_rotate(v, lp, squared, forward=True) if lp.preconditioned else v for v, lp in zip(nu, plan.leaves)]
      return buckets, mu, nu, failures

    def no_refresh(operand):
      buckets, mu, nu = operand
      return buckets, mu, nu, jnp.zeros([], jnp.int32)

    refresh_due = (adam_step == 0) | (adam_step % jnp.asarray(precondition_every, jnp.int32) == 0)
    buckets, new_mu, new_nu, failures = lax.cond(
        refresh_due & grads_finite, refresh, no_refresh, (state.factors, new_mu, new_nu))
    buckets = factor_engine.keep_split(buckets)

    def to_state(moments, codes, scales, kind):
      """(stored moments, their scales): float32, or re-quantized where this step changed them."""
      values = jax.tree.unflatten(treedef, [x.reshape(lp.shape) for x, lp in zip(moments, plan.leaves)])
      if moment_bits is None:
        return values, None
      changed = jax.tree.map(lambda x: stepped & jnp.all(jnp.isfinite(x)), values)
      return moment_storage.store_moment_trees(values, codes, scales, changed, moment_bits, kind,
                                               moment_storage.rounding_key(count, moment_bits, kind))

    mu_stored, mu_scales = to_state(new_mu, state.mu, state.mu_scales, "first")
    nu_stored, nu_scales = to_state(new_nu, state.nu, state.nu_scales, "second")
    new_state = ScaleBySoap4State(
        count=count,
        factors=buckets,
        mu=mu_stored,
        nu=nu_stored,
        nonfinite_steps=state.nonfinite_steps + (~grads_finite).astype(jnp.int32),
        skipped_stats=state.skipped_stats + (refresh_due & ~grads_finite).astype(jnp.int32),
        failed_refreshes=state.failed_refreshes + failures,
        mu_scales=mu_scales,
        nu_scales=nu_scales,
    )
    return jax.tree.unflatten(treedef, outputs), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _in_view(moment: jax.Array, leaf_plan: partition.LeafPlan) -> jax.Array:
  """A stored moment in the layout the step works in (the matrix view for preconditioned leaves)."""
  return moment.reshape(leaf_plan.matrix_shape) if leaf_plan.preconditioned else moment


def _rotate(matrix: jax.Array, leaf_plan: partition.LeafPlan, rows: dict, forward: bool) -> jax.Array:
  """Per block: ``rows_L X rows_Rᵀ`` (``forward``: Q_Lᵀ X Q_R) or ``rows_Lᵀ X rows_R`` (back).

  A side without a factor is left alone.
  """

  def rotate_block(block, b):
    if b.left is not None:
      r = rows[b.left.bucket.name][b.left.index]
      block = linalg.matmul(r if forward else linalg.transpose(r), block)
    if b.right is not None:
      r = rows[b.right.bucket.name][b.right.index]
      block = linalg.matmul(block, linalg.transpose(r) if forward else r)
    return block

  return engine.map_blocks(matrix, leaf_plan, rotate_block)


def _permute(matrix: jax.Array, leaf_plan: partition.LeafPlan, order: dict) -> jax.Array:
  """Per block: rows and columns reordered as the block's left / right eigenvectors."""

  def permute_block(block, b):
    if b.left is not None:
      block = jnp.take(block, order[b.left.bucket.name][b.left.index], axis=0)
    if b.right is not None:
      block = jnp.take(block, order[b.right.bucket.name][b.right.index], axis=1)
    return block

  return engine.map_blocks(matrix, leaf_plan, permute_block)
