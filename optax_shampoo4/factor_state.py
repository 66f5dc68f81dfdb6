"""The containers of a factor bucket and their layout: :class:`EigenFactors` (the ``"eigen"`` format),
:class:`MatrixFactors` (``"naive"`` and ``"fp32"``) and :class:`FactorConfig`, which says how a bucket stores its
matrices (bits, codebook, row tiers). The maths on buckets is :mod:`optax_shampoo4.factors`'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, TypeVar, Union

import jax
import jax.numpy as jnp

from optax_shampoo4 import quantization as qz
from optax_shampoo4.stored_matrices import StoredMatrix

FORMATS = ("eigen", "naive", "fp32")
ROOT_METHODS = ("eigen", "newton", "jorge", "eigh")
REFRESH_METHODS = ("qr", "eigh", "adaptive")

# A square matrix in the state: dense f32, quantized rows, or f32 diag + quantized off-diagonal.


class EigenFactors(NamedTuple):
  """A bucket in the ``"eigen"`` format (``k`` factors of order ``n``).

  Attributes:
    eigvecs: ``[k, n, n]``, row ``i`` of factor ``j`` is its ``i``-th
      eigenvector; a :class:`~optax_shampoo4.quantization.QuantizedArray`
      (codes + scales) or dense float32 for small orders.
    eigvals: ``f32[k, n]``, the Rayleigh quotients matching ``eigvecs`` rows.
    root: the inverse 4th root ``[k, n, n]``, float32 diagonal + quantized
      off-diagonal (:class:`~optax_shampoo4.quantization.OffDiagQuantized`)
      or dense float32; None where no root is stored.
    root_eigvals: ``f32[k, n]`` or None: with no stored root, the
      eigenvalues as of the last root update (PIRU), which the roots formed
      at every step use with the current basis (``store_root="eigvals"`` of
      :func:`~optax_shampoo4.scale_by_shampoo4`); None: the roots use
      ``eigvals``.
  """

  eigvecs: StoredMatrix
  eigvals: jax.Array
  root: StoredMatrix | None
  root_eigvals: jax.Array | None = None


class MatrixFactors(NamedTuple):
  """A bucket in the ``"naive"`` or ``"fp32"`` format.

  Attributes:
    stats: the statistic ``[k, n, n]`` (:math:`L` or :math:`R`).
    root: its inverse 4th root ``[k, n, n]``.
  """

  stats: StoredMatrix | None
  root: StoredMatrix | None


Bucket = Union[EigenFactors, MatrixFactors]
# One bucket type, kept through the functions that refresh it.
BucketT = TypeVar("BucketT", bound=Bucket)


@dataclasses.dataclass(frozen=True)
class FactorConfig:
  """The settings the factor maths needs (static, except ``refresh_tol``).

  Attributes:
    state_format, bits, mapping, quant_block, bjorck_steps, root_method: see
      :func:`~optax_shampoo4.scale_by_shampoo4`.
    refresh_method: how the ``"eigen"`` format's eigenbasis follows the
      updated statistic :math:`A` at each statistics update (PU), starting
      from the rectified stored basis :math:`V`:

      * ``"qr"`` (the paper): ``qr_iterations`` warm-started steps of
        subspace iteration, :math:`P \\leftarrow \\mathrm{qr}(AP).Q` from
        :math:`P = V`, then :math:`\\lambda = \\mathrm{diag}(P^\\top A P)`.
        What :math:`P` leaves off the diagonal of :math:`P^\\top A P` is lost.
      * ``"eigh"``: an exact eigendecomposition of :math:`A` (descending
        order), so the stored statistic is :math:`A` up to quantization.
      * ``"adaptive"`` (Purifying Shampoo's rule): with
        :math:`B = V^\\top A V`, an exact eigendecomposition only where
        :math:`\\|B - \\mathrm{Diag}(B)\\|_F > \\tau \\|B\\|_F`
        (:math:`\\tau` = ``refresh_tol``); elsewhere :math:`V` is kept with
        :math:`\\lambda = \\mathrm{diag}(B)` (sorted descending), which
        discards at most a fraction :math:`\\tau` of :math:`A` (in
        Frobenius norm). The initial basis :math:`I` sees all of :math:`A`'s
        off-diagonal mass, so the first update is exact.
    qr_iterations: QR steps per update for ``"qr"`` (the paper: 1).
    refresh_tol: :math:`\\tau` of ``"adaptive"``; a float or a traced array.
    initial_eigh: with ``"qr"``, a factor whose stored basis is exactly the
      identity (its initial state, so its first update) gets an exact
      eigendecomposition instead of QR steps. False is the paper.
    jorge_damping: with ``root_method="jorge"``, the relative damping
      :math:`\\delta` added to each Gram matrix,
      :math:`M + \\delta \\|M\\|_F I` (keeps the root bounded in directions
      the gradients never visit); a float or a traced array.
    sort_refreshed: with ``"qr"``, sort the refreshed columns by descending
      eigenvalue (False keeps their order, for SOAP's second moment).
    head_fraction: with quantized ``"eigen"`` buckets, the fraction of each
      factor's eigenvectors (the first rows: the largest eigenvalues) stored
      in ``head_bits`` bits instead of ``bits``
      (:class:`~optax_shampoo4.quantization.SplitRowsQuantized`, rectified
      head first by :func:`~optax_shampoo4.linalg.bjorck_head_first`); 0
      stores every row in ``bits`` bits.
    head_bits: bits of the head rows (8, or 16: uniform codes).
    mid_fraction: with a head, the fraction of the eigenvectors after it
      stored in ``mid_bits`` bits (a second tier, rectified after the head
      and before the tail); 0: none.
    mid_bits: bits of those rows (8).
    tail_rectify: how a refresh rectifies the decoded low-bit rows of a
      factor with a head (``head_fraction``), after projecting the head out
      of them: ``"bjorck"`` (``bjorck_steps[0]`` Björck steps) or ``"qr"``
      (Gram–Schmidt in descending-eigenvalue order by a QR per factor,
      :func:`~optax_shampoo4.linalg.orthonormal_head_first_parts`: exactly
      orthonormal, and no row's error moves the rows of larger eigenvalues);
      ``"qr_every_step"`` is ``"qr"`` here (its users rectify the same way
      at every use of the basis).
    quant_damping: :math:`\\delta`, extra damping :math:`\\delta\\lambda_{\\max}`
      of the ``"eigen"`` format's roots from eigenpairs (``root_method="eigen"``),
      on top of ε: a floor under the eigenvalues of a quantized basis, whose
      rounding error (about :math:`\\delta_q\\lambda_{\\max}`) swamps the smallest
      eigenvalues the inverse root amplifies most; a float or a traced array.
    epsilon_mode: how the roots are damped: ``"relative"`` (the paper,
      :math:`A + \\epsilon\\lambda_{\\max} I`) or ``"absolute"``
      (Distributed Shampoo, :math:`A + \\epsilon I`).
  """

  state_format: str = "eigen"
  bits: int = 4
  mapping: str = "linear2"
  quant_block: int = 64
  bjorck_steps: tuple[int, int] = (1, 4)
  root_method: str = "eigen"
  refresh_method: str = "qr"
  qr_iterations: int = 1
  refresh_tol: jax.typing.ArrayLike = 1e-3
  initial_eigh: bool = False
  jorge_damping: jax.typing.ArrayLike = 1e-6
  sort_refreshed: bool = True
  head_fraction: float = 0.0
  head_bits: int = 8
  mid_fraction: float = 0.0
  mid_bits: int = 8
  epsilon_mode: str = "relative"
  tail_rectify: str = "bjorck"
  quant_damping: jax.typing.ArrayLike = 0.0

  @property
  def absolute_epsilon(self) -> bool:
    """Whether the roots add ε as it is (Distributed Shampoo) rather than ε·λ_max."""
    return self.epsilon_mode == "absolute"

  def head_rows(self, order: int) -> int:
    """Eigenvectors of a quantized factor of this order stored in ``head_bits`` bits (0: none)."""
    if self.head_fraction <= 0 or self.head_bits <= self.bits or order < 2:
      return 0
    return min(order - 1, max(1, math.ceil(order * self.head_fraction)))

  def mid_rows(self, order: int) -> int:
    """Eigenvectors after the head stored in ``mid_bits`` bits (0: none; always at least one tail row)."""
    head = self.head_rows(order)
    if not head or self.mid_fraction <= 0 or not self.bits < self.mid_bits < self.head_bits:
      return 0
    return max(0, min(order - head - 1, math.ceil(order * self.mid_fraction)))

  def store_eigvecs(self, rows: jax.Array, quantized: bool) -> StoredMatrix:
    """Encodes eigenvectors ``[..., n, n]`` (one a row, descending eigenvalues) for the state."""
    head = self.head_rows(rows.shape[-1])
    if quantized and head:
      return qz.quantize_split_rows(rows, head, self.head_bits, self.mapping, self.bits, self.quant_block,
                                    self.mid_rows(rows.shape[-1]), self.mid_bits)
    return self.store(rows, quantized, False)

  def store(self, matrix: jax.Array, quantized: bool, separate_diag: bool) -> StoredMatrix:
    """Encodes float32 ``[..., n, n]`` for the state."""
    if not quantized:
      return matrix.astype(jnp.float32)
    if separate_diag:
      return qz.quantize_offdiag(matrix, self.mapping, self.bits, self.quant_block)
    return qz.quantize(matrix, self.mapping, self.bits, self.quant_block)
