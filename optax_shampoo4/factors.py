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

import dataclasses
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from optax_shampoo4 import linalg
from optax_shampoo4 import quantization as qz

FORMATS = ("eigen", "naive", "fp32")
ROOT_METHODS = ("eigen", "newton")

# A square matrix in the state: dense f32, quantized rows, or f32 diag + quantized off-diagonal.
StoredMatrix = Union[jax.Array, qz.QuantizedArray, qz.OffDiagQuantized]


class EigenFactors(NamedTuple):
  """A bucket in the ``"eigen"`` format (``k`` factors of order ``n``).

  Attributes:
    eigvecs: ``[k, n, n]``, row ``i`` of factor ``j`` is its ``i``-th
      eigenvector; a :class:`~optax_shampoo4.quantization.QuantizedArray`
      (codes + scales) or dense float32 for small orders.
    eigvals: ``f32[k, n]``, the Rayleigh quotients matching ``eigvecs`` rows.
    root: the inverse 4th root ``[k, n, n]``, float32 diagonal + quantized
      off-diagonal (:class:`~optax_shampoo4.quantization.OffDiagQuantized`)
      or dense float32.
  """

  eigvecs: StoredMatrix
  eigvals: jax.Array
  root: StoredMatrix


class MatrixFactors(NamedTuple):
  """A bucket in the ``"naive"`` or ``"fp32"`` format.

  Attributes:
    stats: the statistic ``[k, n, n]`` (:math:`L` or :math:`R`).
    root: its inverse 4th root ``[k, n, n]``.
  """

  stats: StoredMatrix
  root: StoredMatrix


Bucket = Union[EigenFactors, MatrixFactors]


@dataclasses.dataclass(frozen=True)
class FactorConfig:
  """The static settings the factor maths needs."""

  state_format: str = "eigen"
  bits: int = 4
  mapping: str = "linear2"
  quant_block: int = 64
  bjorck_steps: tuple[int, int] = (1, 4)
  root_method: str = "eigen"

  def store(self, matrix: jax.Array, quantized: bool, separate_diag: bool) -> StoredMatrix:
    """Encodes float32 ``[..., n, n]`` for the state."""
    if not quantized:
      return matrix.astype(jnp.float32)
    if separate_diag:
      return qz.quantize_offdiag(matrix, self.mapping, self.bits, self.quant_block)
    return qz.quantize(matrix, self.mapping, self.bits, self.quant_block)


def load(stored: StoredMatrix) -> jax.Array:
  """Decodes a stored matrix to float32 ``[..., n, n]``."""
  if isinstance(stored, qz.OffDiagQuantized):
    return qz.dequantize_offdiag(stored)
  if isinstance(stored, qz.QuantizedArray):
    return qz.dequantize(stored)
  return stored


def is_quantized(stored: StoredMatrix) -> bool:
  """Whether a stored matrix is quantized (else dense float32)."""
  return isinstance(stored, (qz.QuantizedArray, qz.OffDiagQuantized))


def _all_finite(x: jax.Array) -> jax.Array:
  """Per leading index: are all entries finite? ``[k, ...] -> bool[k]``."""
  return jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)


def _select(ok: jax.Array, new, old):
  """Per factor ``i``: ``new[i]`` where ``ok[i]`` else ``old[i]``."""

  def pick(a, b):
    return jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 1)), a, b)

  return jax.tree.map(pick, new, old)


def _guarded(ok: jax.Array, new: Bucket, old: Bucket) -> tuple[Bucket, jax.Array]:
  return _select(ok, new, old), ok


def init_bucket(
    config: FactorConfig, order: int, size: int, quantized: bool, epsilon: jax.Array
) -> Bucket:
  """``size`` fresh factors: statistics :math:`\\epsilon I`, root :math:`I`."""
  eye = jnp.broadcast_to(jnp.eye(order, dtype=jnp.float32), (size, order, order))
  root = config.store(eye, quantized, separate_diag=True)
  eps = jnp.asarray(epsilon, jnp.float32)
  if config.state_format == "eigen":
    eigvals = jnp.full((size, order), eps, jnp.float32)
    return EigenFactors(config.store(eye, quantized, separate_diag=False), eigvals, root)
  return MatrixFactors(config.store(eps * eye, quantized, separate_diag=True), root)


def _rectified_eigvecs(bucket: EigenFactors, steps: int) -> jax.Array:
  """Dequantized eigenvectors (rows), Björck-rectified only if quantized."""
  rows = load(bucket.eigvecs)
  if is_quantized(bucket.eigvecs):
    rows = linalg.bjorck(rows, steps)
  return rows


def update_stats(
    config: FactorConfig, bucket: Bucket, grams: jax.Array, beta: jax.Array
) -> tuple[Bucket, jax.Array]:
  """PU (paper Alg. 1) for every factor: fold ``grams`` ``[k, n, n]`` in.

  ``"eigen"``: :math:`V = \\mathrm{Björck}^{t_1}(D(\\bar U))`,
  :math:`A = \\beta V \\Lambda V^\\top + (1-\\beta) M`,
  :math:`P = \\mathrm{qr}(AV).Q`, :math:`\\lambda = \\mathrm{diag}(P^\\top A P)`;
  stores :math:`Q(P^\\top)`. Other formats: :math:`L = \\beta L + (1-\\beta)M`.

  Returns:
    The new bucket and ``bool[k]``: False where a factor's update was
    rejected as non-finite (that factor keeps its previous value).
  """
  beta = jnp.asarray(beta, jnp.float32)
  if isinstance(bucket, EigenFactors):
    rows = _rectified_eigvecs(bucket, config.bjorck_steps[0])
    cols = linalg.transpose(rows)
    stat = beta * linalg.matmul(cols * bucket.eigvals[:, None, :], rows)
    stat = stat + (1.0 - beta) * grams
    eigvecs, eigvals = linalg.qr_refresh(stat, cols)
    ok = _all_finite(eigvecs) & _all_finite(eigvals)
    stored = config.store(linalg.transpose(eigvecs), is_quantized(bucket.eigvecs), False)
    new = EigenFactors(stored, eigvals, bucket.root)
  else:
    stat = beta * load(bucket.stats) + (1.0 - beta) * grams
    ok = _all_finite(stat)
    new = MatrixFactors(config.store(stat, is_quantized(bucket.stats), True), bucket.root)
  return _guarded(ok, new, bucket)


def update_root(
    config: FactorConfig, bucket: Bucket, epsilon: jax.Array
) -> tuple[Bucket, jax.Array]:
  """PIRU (paper Alg. 2; Alg. 4 for the matrix formats) for every factor.

  ``"eigen"`` with ``root_method="eigen"``:
  :math:`V = \\mathrm{Björck}^{t_2}(D(\\bar U))`,
  :math:`\\hat A = V (\\Lambda + \\epsilon \\max\\lambda\\, I)^{-1/4} V^\\top`.
  With ``"newton"`` (and always for the matrix formats) the root of the
  (re-assembled) statistic comes from coupled Newton iteration.

  Returns:
    The new bucket and ``bool[k]``: False where a root was rejected as
    non-finite (that factor keeps its previous root).
  """
  epsilon = jnp.asarray(epsilon, jnp.float32)
  if isinstance(bucket, EigenFactors):
    rows = _rectified_eigvecs(bucket, config.bjorck_steps[1])
    cols = linalg.transpose(rows)
    if config.root_method == "eigen":
      root = linalg.inverse_root_from_eig(cols, bucket.eigvals, epsilon)
    else:
      stat = linalg.matmul(cols * jnp.maximum(bucket.eigvals, 0.0)[:, None, :], rows)
      root = linalg.inverse_root_newton(stat, epsilon)
    new = EigenFactors(bucket.eigvecs, bucket.eigvals, None)
  else:
    root = linalg.inverse_root_newton(load(bucket.stats), epsilon)
    new = MatrixFactors(bucket.stats, None)
  ok = _all_finite(root)
  new = new._replace(root=config.store(root, is_quantized(bucket.root), True))
  return _guarded(ok, new, bucket)


def root_matrices(bucket: Bucket) -> jax.Array:
  """The dequantized float32 inverse roots of a bucket, ``[k, n, n]``."""
  return load(bucket.root)
