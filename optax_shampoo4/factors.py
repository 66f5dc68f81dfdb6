"""One bucket of stacked Shampoo factors, in each state format.

A bucket holds ``k`` factors of one order ``n`` along a leading axis, so every
operation here is batched over ``k``. Three formats:

* ``"eigen"`` (the paper's 4-bit Shampoo, Alg. 1–3): :class:`EigenFactors`
  with eigenvalues in float32, eigenvectors stored transposed (one
  eigenvector a row, so each quantization block lies inside one eigenvector)
  and the inverse root as a float32 diagonal plus quantized off-diagonal.
* ``"naive"`` (the paper's naive 4-bit baseline, §3.1): :class:`MatrixFactors`
  with the statistic and the root each as a float32 diagonal plus quantized
  off-diagonal; the root from coupled Newton on the dequantized statistic.
* ``"fp32"`` (the paper's 32-bit Shampoo, Alg. 4): :class:`MatrixFactors` with
  dense float32 matrices.

Buckets whose order is below ``min_quant_order`` use the same containers with
dense float32 arrays in place of quantized ones (and no Björck rectification,
as in the reference code).

Refreshes never let a non-finite value into the state: each factor whose new
value is not finite keeps its previous value, and a per-factor mask of
accepted refreshes is returned so the transform can count failures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_shampoo4 import linalg, roots
from optax_shampoo4.factor_state import (  # noqa: F401
  FORMATS,
  REFRESH_METHODS,
  ROOT_METHODS,
  Bucket,
  BucketT,
  EigenFactors,
  FactorConfig,
  MatrixFactors,
)
from optax_shampoo4.stored_matrices import StoredMatrix, is_quantized, kept, load, rectified  # noqa: F401


def _all_finite(x: jax.Array) -> jax.Array:
  """Per leading index: are all entries finite? ``[k, ...] -> bool[k]``."""
  return jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)


def _select(ok: jax.Array, new, old):
  """Per factor ``i``: ``new[i]`` where ``ok[i]`` else ``old[i]``."""

  def pick(a, b):
    return jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 1)), a, b)

  return jax.tree.map(pick, new, old)


def _guarded(ok: jax.Array, new: BucketT, old: BucketT) -> tuple[BucketT, jax.Array]:
  return _select(ok, new, old), ok


def init_bucket(
    config: FactorConfig, order: int, size: int, quantized: bool, epsilon: jax.Array
) -> Bucket:
  """``size`` fresh factors: statistics :math:`\\epsilon I` (``"eigen"``: eigenvalues ε, basis
  :math:`I`; ε = 0 gives the zero statistic), root :math:`I`."""
  eye = jnp.broadcast_to(jnp.eye(order, dtype=jnp.float32), (size, order, order))
  root = config.store(eye, quantized, separate_diag=True)
  eps = jnp.asarray(epsilon, jnp.float32)
  if config.state_format == "eigen":
    eigvals = jnp.full((size, order), eps, jnp.float32)
    return EigenFactors(config.store_eigvecs(eye, quantized), eigvals, root)
  if config.root_method == "jorge":  # Jorge keeps the root only, no statistic.
    return MatrixFactors(None, root)
  return MatrixFactors(config.store(eps * eye, quantized, separate_diag=True), root)


def _jorge_stats(config: FactorConfig, bucket: MatrixFactors, grams: jax.Array,
                 beta: jax.Array) -> tuple[MatrixFactors, jax.Array]:
  """Jorge's PU: the inverse root itself follows the statistic, matmuls only.

  :math:`\\hat L \\leftarrow` :func:`~optax_shampoo4.roots.jorge_root_update`
  of :math:`(\\hat L, M + \\delta \\|M\\|_F I)` with the EMA decay ``beta``;
  a factor whose Gram matrix is zero (a padding factor, a dead layer) keeps
  its root.
  """
  order = grams.shape[-1]
  norms = jnp.linalg.norm(grams, axis=(-2, -1))
  damping = jnp.asarray(config.jorge_damping, jnp.float32) * norms
  damped = grams + damping[:, None, None] * jnp.eye(order, dtype=jnp.float32)
  old_root = kept(bucket.root, "root")
  root, _ = roots.jorge_root_update(load(old_root), damped, beta)
  root = jnp.where((norms > 0)[:, None, None], root, load(old_root))
  ok = _all_finite(root)
  return _guarded(ok, MatrixFactors(None, config.store(root, is_quantized(old_root), True)), bucket)


def _rectified_eigvecs(bucket: EigenFactors, steps: int) -> jax.Array:
  """Dequantized eigenvectors (rows), Björck-rectified only if quantized."""
  return rectified(bucket.eigvecs, steps)


def _is_identity(rows: jax.Array) -> jax.Array:
  """Per factor: is the basis exactly the identity (the initial state)? ``bool[k]``."""
  eye = jnp.eye(rows.shape[-1], dtype=rows.dtype)
  return jnp.all((rows == eye).reshape(rows.shape[0], -1), axis=1)


def _offdiag_fraction(b: jax.Array) -> jax.Array:
  """:math:`\\|B - \\mathrm{Diag}(B)\\|_F / \\|B\\|_F` per matrix of ``[k, n, n]``."""
  diag = jnp.diagonal(b, axis1=-2, axis2=-1)
  total = jnp.sum(b * b, axis=(-2, -1))
  off = jnp.maximum(total - jnp.sum(diag * diag, axis=-1), 0.0)
  return jnp.sqrt(off / jnp.where(total > 0, total, 1.0))


def refresh_eigenbasis(
    config: FactorConfig, stat: jax.Array, cols: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """New eigenpairs of ``stat`` ``[k, n, n]`` from the basis ``cols`` (columns).

  Applies ``config.refresh_method`` (see :class:`FactorConfig`).

  Returns:
    ``(V, λ)``: eigenvectors as columns and eigenvalues, descending.
  """
  if config.refresh_method == "eigh":
    return linalg.eigh_descending(stat)
  if config.refresh_method == "qr":
    eigvecs, eigvals = linalg.qr_refresh(stat, cols, config.qr_iterations, sort=config.sort_refreshed)
    if config.initial_eigh:
      need = _is_identity(cols)
      eigvecs, eigvals = linalg.eigh_where(need, stat, eigvecs, eigvals)
    return eigvecs, eigvals
  b = linalg.matmul(linalg.transpose(cols), linalg.matmul(stat, cols))
  eigvecs, eigvals = linalg.sort_descending(cols, jnp.diagonal(b, axis1=-2, axis2=-1))
  tol = jnp.asarray(config.refresh_tol, jnp.float32)
  return linalg.eigh_where(_offdiag_fraction(b) > tol, stat, eigvecs, eigvals)


def gram_weight(beta: jax.Array) -> jax.Array:
  """The weight of a new Gram matrix: :math:`1-\\beta`, or 1 for :math:`\\beta = 1` (a running sum, AdaGrad)."""
  return jnp.where(beta == 1.0, jnp.ones_like(beta), 1.0 - beta)


def update_stats(
    config: FactorConfig, bucket: Bucket, grams: jax.Array, beta: jax.Array,
    row_order: jax.Array | None = None,
) -> tuple[Bucket, jax.Array]:
  """PU (paper Alg. 1) for every factor: fold ``grams`` ``[k, n, n]`` in.

  ``"eigen"``: :math:`V = \\mathrm{Björck}^{t_1}(D(\\bar U))`,
  :math:`A = \\beta V \\Lambda V^\\top + (1-\\beta) M`, then new
  eigenpairs of :math:`A` by ``config.refresh_method`` (the paper:
  :math:`P = \\mathrm{qr}(AV).Q`, :math:`\\lambda = \\mathrm{diag}(P^\\top A P)`),
  sorted by descending eigenvalue unless ``config.sort_refreshed`` is False;
  stores :math:`Q(P^\\top)`. The root is left as it is (and may be ``None``,
  for users that keep no root). Other formats: :math:`L = \\beta L + (1-\\beta)M`.
  With :math:`\\beta = 1` the weight of :math:`M` is 1 (a sum, :func:`gram_weight`).

  Args:
    config: the factor settings.
    bucket: the factors, stacked ``[k, ...]``.
    grams: ``[k, n, n]``, this step's Gram matrices.
    beta: EMA decay of the statistic.
    row_order: ``"eigen"`` only, optional ``int[k, n]``: the eigenpairs
      (rectified rows of :math:`V` and :math:`\\Lambda`) are reordered by it
      before the refresh, so the refreshed columns come out in that order
      (SOAP sorts this way). The permutation is applied to the decoded rows
      and costs no extra decode and encode of the stored codes.

  Returns:
    The new bucket and ``bool[k]``: False where a factor's update was
    rejected as non-finite (that factor keeps its previous value, in its
    previous order).
  """
  beta = jnp.asarray(beta, jnp.float32)
  if isinstance(bucket, EigenFactors):
    return update_eigen_stats(config, bucket, grams, beta, row_order)[:2]
  if config.root_method == "jorge":
    return _jorge_stats(config, bucket, grams, beta)
  old_stats = kept(bucket.stats, "stats")
  stat = beta * load(old_stats) + gram_weight(beta) * grams
  ok = _all_finite(stat)
  new = MatrixFactors(config.store(stat, is_quantized(old_stats), True), bucket.root)
  return _guarded(ok, new, bucket)


def update_eigen_stats(
    config: FactorConfig, bucket: EigenFactors, grams: jax.Array, beta: jax.Array,
    row_order: jax.Array | None = None,
) -> tuple[EigenFactors, jax.Array, jax.Array]:
  """:func:`update_stats` of an ``"eigen"`` bucket that also returns the refreshed basis as computed.

  Returns:
    ``(bucket, accepted, rows)``: the new bucket and ``bool[k]`` as
    :func:`update_stats`, and ``f32[k, n, n]`` the new eigenvectors as rows
    in float32 *before* they are stored (quantized): the refresh's rotation
    without the new basis' rounding (SOAP carries its moments by it). Where
    a refresh was rejected, the previous basis as the refresh decoded it.
  """
  beta = jnp.asarray(beta, jnp.float32)
  rows = rectified(bucket.eigvecs, config.bjorck_steps[0], tail_qr=config.tail_rectify != "bjorck")
  previous = rows
  eigvals = bucket.eigvals
  if row_order is not None:
    rows = jnp.take_along_axis(rows, row_order[:, :, None], axis=1)
    eigvals = jnp.take_along_axis(eigvals, row_order, axis=1)
  cols = linalg.transpose(rows)
  stat = beta * linalg.matmul(cols * eigvals[:, None, :], rows)
  stat = stat + gram_weight(beta) * grams
  eigvecs, eigvals = refresh_eigenbasis(config, stat, cols)
  ok = _all_finite(eigvecs) & _all_finite(eigvals)
  refreshed = linalg.transpose(eigvecs)
  stored = config.store_eigvecs(refreshed, is_quantized(bucket.eigvecs))
  new, ok = _guarded(ok, bucket._replace(eigvecs=stored, eigvals=eigvals), bucket)
  return new, ok, _select(ok, refreshed, previous)


def update_root(
    config: FactorConfig, bucket: Bucket, epsilon: jax.Array
) -> tuple[Bucket, jax.Array]:
  """PIRU (paper Alg. 2; Alg. 4 for the matrix formats) for every factor.

  ``"eigen"`` with ``root_method="eigen"``:
  :math:`V = \\mathrm{Björck}^{t_2}(D(\\bar U))`,
  :math:`\\hat A = V (\\Lambda + \\epsilon \\max\\lambda\\, I)^{-1/4} V^\\top`.
  With ``"newton"`` the root of the (re-assembled) statistic comes from
  coupled Newton iteration; with ``"eigh"`` (matrix formats) from an exact
  eigendecomposition of the statistic (Distributed Shampoo's root; accurate
  on a near-singular statistic with absolute ε, where Newton stalls). With
  ``"jorge"`` the root was already updated with the statistics: no-op.
  A bucket that keeps its roots as eigenvalues only (``root_eigvals`` not
  None) captures the current eigenvalues, :math:`\\Lambda_r \\leftarrow \\Lambda`.
  With ``config.epsilon_mode="absolute"`` the damping is :math:`\\epsilon I`
  in place of :math:`\\epsilon \\max\\lambda\\, I`.

  Returns:
    The new bucket and ``bool[k]``: False where a root was rejected as
    non-finite (that factor keeps its previous root).
  """
  epsilon = jnp.asarray(epsilon, jnp.float32)
  if config.root_method == "jorge":  # the root already follows the statistic (update_stats)
    return bucket, jnp.ones(jax.tree.leaves(bucket.root)[0].shape[:1], bool)
  if isinstance(bucket, EigenFactors) and bucket.root_eigvals is not None:  # the root is kept as its eigenvalues
    return _guarded(_all_finite(bucket.eigvals), bucket._replace(root_eigvals=bucket.eigvals), bucket)
  if isinstance(bucket, EigenFactors):
    if config.root_method == "eigen":
      root = root_from_eigenbasis(config, bucket, epsilon)
    else:
      rows = _rectified_eigvecs(bucket, config.bjorck_steps[1])
      stat = linalg.matmul(linalg.transpose(rows) * jnp.maximum(bucket.eigvals, 0.0)[:, None, :], rows)
      root = roots.inverse_root_newton(stat, epsilon, absolute=config.absolute_epsilon)
  elif config.root_method == "eigh":  # Distributed Shampoo's root: eigh of the dense statistic
    eigvecs, eigvals = linalg.eigh_descending(load(kept(bucket.stats, "stats")))
    root = roots.inverse_root_from_eig(eigvecs, eigvals, epsilon, absolute=config.absolute_epsilon)
  else:
    root = roots.inverse_root_newton(load(kept(bucket.stats, "stats")), epsilon, absolute=config.absolute_epsilon)
  ok = _all_finite(root)
  new = bucket._replace(root=config.store(root, is_quantized(kept(bucket.root, "root")), True))
  return _guarded(ok, new, bucket)


def root_from_eigenbasis(config: FactorConfig, bucket: EigenFactors, epsilon: jax.Array,
                         precision: str = "highest", factored: bool = False) -> jax.Array:
  """The inverse 4th roots of an ``"eigen"`` bucket from its stored eigenpairs, float32 ``[k, n, n]``.

  :math:`V = \\mathrm{Björck}^{t_2}(D(\\bar U))`,
  :math:`\\hat A = V (\\Lambda + \\epsilon \\max\\lambda\\, I)^{-1/4} V^\\top`
  (plus :math:`\\delta\\max\\lambda` with ``config.quant_damping`` δ): PIRU's root (paper Alg. 2), also formed at every step when no root is
  stored (``store_root=False``), then with the final product at the step's
  ``precision`` (:func:`~optax_shampoo4.linalg.step_matmul`; the Björck
  rectification stays at full float32 precision). A bucket with
  ``root_eigvals`` uses them in place of :math:`\\Lambda` (row ``i`` of
  :math:`V` with the ``i``-th eigenvalue as of the last root update).
  With ``factored``, the factor :math:`W = V (\\Lambda + \\dots)^{-1/8}` of
  :math:`\\hat A = W W^\\top` instead
  (:func:`~optax_shampoo4.roots.inverse_root_factor_from_eig`; ``precision`` unused).
  """
  rows = _rectified_eigvecs(bucket, config.bjorck_steps[1])
  eigvals = bucket.eigvals if bucket.root_eigvals is None else bucket.root_eigvals
  epsilon = jnp.asarray(epsilon, jnp.float32)
  if factored:
    return roots.inverse_root_factor_from_eig(linalg.transpose(rows), eigvals, epsilon,
                                              absolute=config.absolute_epsilon, relative_floor=config.quant_damping)
  return roots.inverse_root_from_eig(linalg.transpose(rows), eigvals, epsilon, absolute=config.absolute_epsilon,
                                     precision=precision, relative_floor=config.quant_damping)


def root_matrices(bucket: Bucket) -> jax.Array:
  """The dequantized float32 inverse roots of a bucket, ``[k, n, n]``."""
  return load(kept(bucket.root, "root"))
