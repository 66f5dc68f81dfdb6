r"""Products with a tiered basis whose last tier is projected out of the others inside the product.

A SOAP basis stored in row tiers (a 16-bit head, 8-bit rows, then 4-bit rows; see ``head_fraction`` of
:func:`~optax_shampoo4.scale_by_soap4`) is used at each step as the rows

.. math::

  R = \begin{bmatrix} D \\ T - (T D^\top) D \end{bmatrix}

with :math:`D` (k×n) the more precise tiers, rectified, and :math:`T` (t×n) the decoded 4-bit rows.
Forming :math:`R` costs :math:`4tkn` multiply-adds per factor and step. A product with :math:`R` can
instead project the *other* operand, reusing the rotation's own :math:`DX`:

.. math::

  R X = \begin{bmatrix} B \\ T (X - D^\top B) \end{bmatrix}, \; B = D X; \qquad
  R^\top Y = D^\top (Y_D - D W) + W, \; W = T^\top Y_T

(and the transposed forms for the right side), :math:`2kmn` more than a product with a formed
:math:`R` for an n×m operand, :math:`4kmn` for a step's forward and backward rotation: cheaper than
forming :math:`R` when the block's other dimension :math:`m` is below :math:`t` (e.g. the
512-order factor of a 128×512 block), dearer for square blocks. Each product picks the cheaper form
from the static shapes; the two agree to rounding. :class:`TieredRows` holds :math:`(D, T)`;
:func:`as_matrix` forms :math:`R` where a whole matrix is needed (the refresh's change of basis).
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from optax_shampoo4 import linalg


class TieredRows(NamedTuple):
  """A basis as rows, ``[..., k + t, n]`` once formed: ``head`` (:math:`D`, rectified) and ``tail`` (:math:`T`,
  not yet projected out of ``head``)."""

  head: jax.Array
  tail: jax.Array


Rows = Union[jax.Array, TieredRows]


def as_matrix(rows: Rows) -> jax.Array:
  r"""The rows as one float32 matrix: :math:`[D;\, T - (T D^\top) D]` for :class:`TieredRows`, else ``rows``."""
  if not isinstance(rows, TieredRows):
    return rows
  head, tail = rows
  projected = tail - linalg.matmul(linalg.matmul(tail, linalg.transpose(head)), head)
  return jnp.concatenate([head, projected], axis=-2)


def for_products(rows: Rows, others: list[int]) -> Rows:
  """A stack of rows for products whose operands' other dimensions are ``others``: left tiered only where every
  product projects its operand (batched forming is faster than forming per factor inside the products)."""
  if isinstance(rows, TieredRows) and all(_projects_operand(rows, m) for m in others):
    return rows
  return as_matrix(rows)


def _projects_operand(rows: Rows, other: int) -> bool:
  """Whether to project the operand (other dimension ``other``) rather than form the rows: :math:`m < t`."""
  return isinstance(rows, TieredRows) and other < rows.tail.shape[-2]


def rows_times(rows: Rows, x: jax.Array, precision: str) -> jax.Array:
  r""":math:`R X` (``x``: n×m)."""
  if not _projects_operand(rows, x.shape[-1]):
    return linalg.step_matmul(as_matrix(rows), x, precision)
  head, tail = rows
  b = linalg.step_matmul(head, x, precision)
  rest = linalg.step_matmul(tail, x - linalg.step_matmul(linalg.transpose(head), b, precision), precision)
  return jnp.concatenate([b, rest], axis=-2)


def rows_transposed_times(rows: Rows, y: jax.Array, precision: str) -> jax.Array:
  r""":math:`R^\top Y` (``y``: n×m, its first k rows :math:`Y_D`)."""
  if not _projects_operand(rows, y.shape[-1]):
    return linalg.step_matmul(linalg.transpose(as_matrix(rows)), y, precision)
  head, tail = rows
  k = head.shape[-2]
  w = linalg.step_matmul(linalg.transpose(tail), y[..., k:, :], precision)
  inner = y[..., :k, :] - linalg.step_matmul(head, w, precision)
  return linalg.step_matmul(linalg.transpose(head), inner, precision) + w


def times_rows_transposed(x: jax.Array, rows: Rows, precision: str) -> jax.Array:
  r""":math:`X R^\top` (``x``: m×n)."""
  if not _projects_operand(rows, x.shape[-2]):
    return linalg.step_matmul(x, linalg.transpose(as_matrix(rows)), precision)
  head, tail = rows
  a = linalg.step_matmul(x, linalg.transpose(head), precision)
  rest = linalg.step_matmul(x - linalg.step_matmul(a, head, precision), linalg.transpose(tail), precision)
  return jnp.concatenate([a, rest], axis=-1)


def times_rows(y: jax.Array, rows: Rows, precision: str) -> jax.Array:
  r""":math:`Y R` (``y``: m×n, its first k columns :math:`Y_D`)."""
  if not _projects_operand(rows, y.shape[-2]):
    return linalg.step_matmul(y, as_matrix(rows), precision)
  head, tail = rows
  k = head.shape[-2]
  z = linalg.step_matmul(y[..., k:], tail, precision)
  inner = y[..., :k] - linalg.step_matmul(z, linalg.transpose(head), precision)
  return linalg.step_matmul(inner, head, precision) + z
