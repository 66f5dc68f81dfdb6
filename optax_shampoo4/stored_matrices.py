"""Matrices as a factor bucket stores them: dense float32 or quantized (block codes, a float32 diagonal plus a
quantized off-diagonal, or rows split into precision tiers), and their decoding.

:func:`load` decodes any of them; :func:`rectified` decodes stored eigenvectors and makes them orthonormal
(Björck, tier by tier for split rows); :func:`kept` and :func:`is_quantized` inspect what a bucket keeps.
"""

from __future__ import annotations

from typing import Union

import jax

from optax_shampoo4 import linalg
from optax_shampoo4 import quantization as qz

StoredMatrix = Union[jax.Array, qz.QuantizedArray, qz.OffDiagQuantized, qz.SplitRowsQuantized]


def load(stored: StoredMatrix) -> jax.Array:
  """Decodes a stored matrix to float32 ``[..., n, n]``."""
  if isinstance(stored, qz.SplitRowsQuantized):
    return qz.dequantize_split_rows(stored)
  if isinstance(stored, qz.OffDiagQuantized):
    return qz.dequantize_offdiag(stored)
  if isinstance(stored, qz.QuantizedArray):
    return qz.dequantize(stored)
  return stored


def kept(stored: StoredMatrix | None, part: str) -> StoredMatrix:
  """``stored``, a part (``"stats"``, ``"root"``) that the bucket's format keeps; None here is a bug."""
  if stored is None:
    raise ValueError(f"this bucket keeps no {part} (its format or root method stores none)")
  return stored


def is_quantized(stored: StoredMatrix) -> bool:
  """Whether a stored matrix is quantized (else dense float32)."""
  return isinstance(stored, (qz.QuantizedArray, qz.OffDiagQuantized, qz.SplitRowsQuantized))


def rectified(stored: StoredMatrix, steps: int, tail_steps: int | None = None, tail_qr: bool = False,
              always_project: bool = False) -> jax.Array:
  """Stored eigenvectors (rows) dequantized and Björck-rectified; dense float32 ones as they are.

  Split rows (:class:`~optax_shampoo4.quantization.SplitRowsQuantized`) are
  rectified tier by tier, most precise first
  (:func:`~optax_shampoo4.linalg.rectified_tiers`: ``tail_steps`` Björck
  steps on the last tier, None: ``steps``), or with ``tail_qr`` the last
  tier made exactly orthonormal by Gram–Schmidt (``tail_steps`` unused);
  with ``always_project`` the tiers are projected even for ``steps=0``.
  """
  if isinstance(stored, qz.SplitRowsQuantized):
    tiers = [qz.dequantize(part) for part in qz.row_tiers(stored)]
    return linalg.rectified_tiers(tiers, steps, tail_steps, tail_qr, always_project)
  rows = load(stored)
  if is_quantized(stored):
    return linalg.bjorck(rows, steps)
  return rows
