r"""Searching a small sorted codebook for many values at once: one table lookup and at most two comparisons.

Quantizing to a codebook :math:`R` of :math:`2^b` sorted values needs, per
element, the number of codebook entries below it (the code of the nearest
entry is that count over the midpoints between entries; stochastic rounding
needs the two entries around the value). A binary search costs :math:`b`
dependent gathers per element, a comparison against every entry
:math:`2^b` comparisons; both dominate an 8-bit optimizer step on CPU.

:func:`sorted_search` instead maps the float32 bit pattern of :math:`x` to an
order-preserving integer (:math:`k = \mathrm{bits}` for :math:`x \ge 0`,
:math:`k = \mathrm{bits} \oplus \mathtt{0x7FFFFFFF}` otherwise), cuts that
integer line into buckets of :math:`2^s` consecutive floats (a fixed fraction
of an octave, so buckets are as fine near 0 as near 1), and precomputes in
numpy, per bucket, how many entries lie below every float of the bucket. The
search is then a lookup of that count plus a comparison against each of the
next ``window`` entries; :math:`s` is the coarsest shift whose buckets hold at
most two entries (``window <= 2``; a few thousand buckets for the 8-bit
dynamic tree). The result equals ``jnp.searchsorted(values, x, side)`` exactly
for every float32 ``x`` (tested against it), at a fraction of the cost.

Values outside :math:`[-2, 2]` (codebooks here lie in :math:`[-1, 1]`) share
the two end buckets, whose windows still bracket them; NaN gives a count in
``[0, len(values)]``. Bucket bounds are computed with subnormals both as they
are and flushed to zero, so the result is exact whether or not the backend
flushes them in comparisons. Up to 16 values are compared against every
value instead (``jnp.searchsorted(..., method="compare_all")``, faster there).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shampoo4 import sharding

_LIMIT = 2.0  # values in [-_LIMIT, _LIMIT] get their own buckets
_MAX_WINDOW = 2  # comparisons per element after the lookup
# As numpy's: "left" counts the entries < x, "right" those <= x.
Side = Literal["left", "right"]
_SIDES = ("left", "right")
# Up to this many values, comparing against every one is faster on XLA:CPU than the lookup (the 4-bit tables);
# for the 8-bit ones the lookup is faster than a binary search (benchmarks/moment_store_parts.py; the docs'
# results/design page).
_COMPARE_ALL_MAX = 16


def _order_key(x: np.ndarray) -> np.ndarray:
  """The order-preserving int64 key of float32 values (numpy; -0.0 maps just below +0.0)."""
  bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
  return np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _key_to_float(key: np.ndarray) -> np.ndarray:
  """Inverse of :func:`_order_key`."""
  key = np.asarray(key, np.int64)
  bits = np.where(key < 0, (-(key + 1)) | 0x80000000, key).astype(np.uint32)
  return bits.view(np.float32)


def _flushed(x: np.ndarray) -> np.ndarray:
  """``x`` with float32 subnormals replaced by a zero of their sign."""
  return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.copysign(0.0, x), x)


class _Plan(NamedTuple):
  shift: int  # bucket = (key >> shift) - first_bucket
  first_bucket: int
  key_range: tuple[int, int]  # keys are clipped to it
  counts: np.ndarray  # int32[buckets]: entries below every value of the bucket
  padded: np.ndarray  # float32: the values, then `window` NaNs
  window: int


@functools.lru_cache(maxsize=64)
def _plan(values_bytes: bytes, side: Side) -> _Plan:
  values = np.frombuffer(values_bytes, np.float32)
  key_min, key_max = (int(k) for k in _order_key(np.array([-_LIMIT, _LIMIT], np.float32)))
  for shift in range(26, 9, -1):  # the coarsest buckets that need at most _MAX_WINDOW comparisons
    first, last = key_min >> shift, key_max >> shift
    starts = np.arange(first, last + 1, dtype=np.int64) << shift
    low = _key_to_float(np.maximum(starts, key_min)).astype(np.float64)
    high = _key_to_float(np.minimum(starts + (1 << shift) - 1, key_max)).astype(np.float64)
    low[0], high[-1] = -np.inf, np.inf  # clipped keys land in the end buckets
    # A backend may flush subnormals to zero in comparisons (XLA:CPU does): bracket both readings.
    low, high = np.minimum(low, _flushed(low)), np.maximum(high, _flushed(high))
    counts = np.searchsorted(values, low, side)
    window = int((np.searchsorted(values, high, side) - counts).max())
    if window <= _MAX_WINDOW:
      break
  padded = np.concatenate([values, np.full(window, np.nan, np.float32)])  # NaN: never counted
  return _Plan(shift, first, (key_min, key_max), counts.astype(np.int32), padded, window)


def sorted_search(values: np.ndarray, x: jax.Array, side: Side = "left") -> jax.Array:
  """``jnp.searchsorted(values, x, side)`` for a small sorted constant ``values``, by bucket lookup.

  Args:
    values: sorted, finite float32 numpy values (a codebook or its midpoints).
    x: a float array (compared in float32).
    side: ``"left"`` (the count of entries ``< x``) or ``"right"`` (``<= x``).

  Returns:
    int32 counts, shaped like ``x``.

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from optax_shampoo4.code_search import sorted_search
    >>> sorted_search(np.array([-1, 0, 0.5, 1], np.float32), jnp.array([-2.0, 0.0, 0.7, 3.0])).tolist()
    [0, 1, 3, 4]
  """
  if side not in _SIDES:
    raise ValueError(f"side must be one of {_SIDES}, got side={side!r}")
  values = np.asarray(values, np.float32)
  if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(np.diff(values) < 0):
    raise ValueError(f"values must be a sorted, finite 1-D array, got {values!r}")
  x = jnp.asarray(x, jnp.float32)
  if values.size <= _COMPARE_ALL_MAX:
    return jnp.searchsorted(jnp.asarray(values), x, side=side, method="compare_all").astype(jnp.int32)
  plan = _plan(values.tobytes(), side)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  key = jnp.clip(jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits), *plan.key_range)
  below = sharding.table_lookup(plan.counts, (key >> plan.shift) - plan.first_bucket, mode="clip")
  count = below
  padded = jnp.asarray(plan.padded)
  for offset in range(plan.window):
    entry = sharding.table_lookup(padded, below + offset, mode="clip")
    count = count + (entry <= x if side == "right" else entry < x).astype(jnp.int32)
  return count
