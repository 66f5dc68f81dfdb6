"""Bytes of an optimizer state, by part, without touching device memory."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from optax_shampoo4 import factors as fct
from optax_shampoo4 import moments
from optax_shampoo4 import quantization as qz
from optax_shampoo4.soap import ScaleBySoap4State

# State types holding moments as (codes, scales) field pairs.
QUANTIZED_STATES = {**moments.QUANTIZED_STATES, ScaleBySoap4State: (("mu", "mu_scales"), ("nu", "nu_scales"))}

PARTS = (
    "quantized_codes",  # packed uint8 codes of quantized matrices
    "quantized_scales",  # float32 absmax scales of those codes
    "eigenvalues",  # float32 eigenvalues ("eigen" format)
    "diagonals",  # float32 diagonals kept beside quantized off-diagonals
    "dense_factors",  # float32 factor matrices (fp32 format, small orders)
    "first_order",  # other array leaves outside Shampoo factors (float32 Adam moments, momentum, ...)
    "other",  # scalars: step counts, failure counters
    "moment_codes",  # uint8 codes of quantized first-order moments (optax_shampoo4.moments)
    "moment_scales",  # float32 scales of those codes (block absmax or rank-1 maxima)
)


def _nbytes(leaf: Any) -> int:
  return int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def state_nbytes(state: Any) -> dict[str, int]:
  """Bytes of each part of an optimizer state, and their ``"total"``.

  Works on concrete states and on ``jax.eval_shape`` output alike, so the
  state of a large model is measured without allocating it. Also reports
  ``"preconditioner"``: the sum of the Shampoo factor parts.

  Args:
    state: any optimizer state (e.g. of an ``optax.chain``) that may contain
      :class:`~optax_shampoo4.ScaleByShampoo4State`.

  Returns:
    ``{part: bytes}`` for every part in :data:`PARTS`, plus
    ``"preconditioner"`` and ``"total"``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_shampoo4 as s4
    >>> tx = s4.scale_by_shampoo4()
    >>> shapes = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((512, 512), jnp.float32)})
    >>> s4.state_nbytes(shapes)["quantized_codes"]  # 2 factors x 2 matrices x 512*256 bytes
    524288
  """
  parts = dict.fromkeys(PARTS, 0)

  def add_stored(stored: Any) -> None:
    if stored is None:  # a part this format does not keep (SOAP's root, Jorge's statistic)
      return
    if isinstance(stored, qz.OffDiagQuantized):
      parts["diagonals"] += _nbytes(stored.diag)
      add_stored(stored.offdiag)
    elif isinstance(stored, qz.SplitRowsQuantized):
      add_stored(stored.head)
      add_stored(stored.tail)
    elif isinstance(stored, qz.QuantizedArray):
      parts["quantized_codes"] += _nbytes(stored.codes)
      parts["quantized_scales"] += _nbytes(stored.scales)
    else:
      parts["dense_factors"] += _nbytes(stored)

  def is_bucket(node: Any) -> bool:
    return isinstance(node, (fct.EigenFactors, fct.MatrixFactors, moments.QuantizedMoment, *QUANTIZED_STATES))

  def count(tree: Any) -> None:
    for node in jax.tree.leaves(tree, is_leaf=is_bucket):
      if isinstance(node, fct.EigenFactors):
        add_stored(node.eigvecs)
        parts["eigenvalues"] += _nbytes(node.eigvals)
        add_stored(node.root)
      elif isinstance(node, fct.MatrixFactors):
        add_stored(node.stats)
        add_stored(node.root)
      elif isinstance(node, moments.QuantizedMoment):
        parts["moment_codes"] += _nbytes(node.codes)
        parts["moment_scales"] += _nbytes(node.scales)
      elif isinstance(node, tuple(QUANTIZED_STATES)):
        stored = [name for pair in QUANTIZED_STATES[type(node)] for name in pair]
        for name, tree in zip(node._fields, node):
          if name not in stored:
            count(tree)  # counters, factor buckets
            continue
          for leaf in jax.tree.leaves(tree):
            if np.ndim(leaf) == 0:
              parts["other"] += _nbytes(leaf)  # a small tensor's placeholder scale
            elif name.endswith("_scales"):
              parts["moment_scales"] += _nbytes(leaf)
            elif leaf.dtype == np.uint8:
              parts["moment_codes"] += _nbytes(leaf)
            else:  # a float32 moment (a small tensor's, or all of them without moment_bits)
              parts["first_order"] += _nbytes(leaf)
      elif np.ndim(node) >= 1:
        parts["first_order"] += _nbytes(node)
      else:
        parts["other"] += _nbytes(node)

  count(state)
  parts["preconditioner"] = sum(parts[p] for p in PARTS[:5])
  parts["total"] = sum(parts[p] for p in PARTS)
  return parts
