"""Storage of first-order optimizer moments in 8 or 4 bits (one tensor at a time).

The encodings behind :mod:`optax_shampoo4.moments`: per moment kind and bit
width a :data:`SCHEMES` entry (codebook, block size, rank-1 normalization),
:func:`store_moment` / :func:`load_moment` and the :class:`QuantizedMoment`
container, reusable by any optimizer that keeps a moment in its own state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shampoo4 import code_search, sharding
from optax_shampoo4 import quantization as qz

MOMENT_BITS = (4, 8)
KINDS = ("first", "second")
MIN_QUANTIZED_SIZE = 4096
RANK1 = 0  # ``block`` of a rank-1 normalized moment



class Scheme(NamedTuple):
  """How a moment of one kind is stored in one bit width."""

  mapping: str  # codebook (quantization.codebook)
  block: int  # elements per absmax block along the last axis (4-bit second moments with ndim >= 2: rank-1)
  stochastic: bool  # the transforms round stochastically (unbiased) rather than to the nearest code


SCHEMES = {
    (8, "first"): Scheme("dynamic_tree", 256, stochastic=True),
    (8, "second"): Scheme("dynamic_tree_unsigned", 256, stochastic=True),
    (4, "first"): Scheme("dynamic_tree", 128, stochastic=True),
    (4, "second"): Scheme("linear_unsigned_nonzero", 128, stochastic=False),
}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["shape", "kind", "bits", "mapping", "block"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedMoment:
  """A moment tensor stored as codes and scales (see :func:`store_moment`).

  Attributes:
    codes: ``uint8[*shape[:-1], n]`` with ``n = shape[-1]`` (8 bits) or
      ``ceil(shape[-1] / 2)`` (4 bits, two codes a byte, low nibble first).
    scales: float32, the scale of each block, ``[*shape[:-1], ceil(shape[-1] /
      block)]``: the block's largest-magnitude value *with its sign* (so that
      value is stored exactly: the signed dynamic tree has +1 but not -1; the
      positive one when both signs tie); or
      for rank-1 normalization the maxima of every axis, concatenated,
      ``[sum(shape)]``.
    shape: the moment's shape (static).
    kind: ``"first"`` (signed) or ``"second"`` (non-negative) (static).
    bits: 8 or 4 (static).
    mapping: the codebook name (static).
    block: elements per absmax block along the last axis, or ``RANK1`` (0).
  """

  codes: jax.Array
  scales: jax.Array
  shape: tuple[int, ...]
  kind: str
  bits: int
  mapping: str
  block: int


def check_moment_bits(name: str, value: Any) -> None:
  """Raises ValueError unless ``value`` is None or a static int in :data:`MOMENT_BITS`."""
  if value is None:
    return
  if isinstance(value, jax.Array):
    raise ValueError(
        f"{name} must be None or a static Python int in {MOMENT_BITS}, got {name}={value!r}; "
        f"with optax.inject_hyperparams, list it in static_args")
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in MOMENT_BITS:
    raise ValueError(f"{name} must be None or one of {MOMENT_BITS}, got {name}={value!r}")


def _check_kind(kind: Any) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")


def _axis_maxima(x: jax.Array) -> tuple[jax.Array, ...]:
  """For each axis, the max over all other axes (a vector of that axis' length), replicated."""
  return tuple(sharding.unsplit(jnp.max(x, axis=tuple(a for a in range(x.ndim) if a != axis)))
               for axis in range(x.ndim))


def _rank1_normalizer(maxima: tuple[jax.Array, ...]) -> jax.Array:
  """min over axes of the axis maxima, broadcast to the full shape."""
  ndim = len(maxima)
  # Replicated (small vectors): under explicit sharding a row and a column vector split over one mesh axis
  # would broadcast to a matrix split twice over it.
  maxima = tuple(sharding.unsplit(m) for m in maxima)
  shaped = [m.reshape(tuple(-1 if a == axis else 1 for a in range(ndim))) for axis, m in enumerate(maxima)]
  return functools.reduce(jnp.minimum, shaped)


def _table(mapping: str, bits: int) -> np.ndarray:
  """The codebook as a numpy constant (also while tracing)."""
  with jax.ensure_compile_time_eval():
    return np.asarray(qz.codebook(mapping, bits))


def moment_layout(shape: tuple[int, ...], bits: int | None, kind: str) -> tuple[str, int] | None:
  """``(mapping, block)`` of a moment of this shape, or None when it stays float32."""
  if bits is None or int(np.prod(shape, dtype=np.int64)) < MIN_QUANTIZED_SIZE:
    return None
  mapping, block, _ = SCHEMES[bits, kind]
  if kind == "second" and bits == 4 and len(shape) >= 2:
    block = RANK1
  return mapping, block


def _whole_rows(length: int) -> int:
  """A block covering a whole (even-padded) row, for rank-1 codes without block scales."""
  return length + length % 2


def _mix32(h: jax.Array) -> jax.Array:
  """A bijective avalanche of uint32 values (Wellons' ``lowbias32``: xor-shift-multiply, twice)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def rounding_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  r"""Uniform float32 values in ``[0, 1)`` for stochastic rounding: a counter-based hash of ``(key, index)``.

  Each element's value is :math:`2^{-24}\lfloor h / 2^8 \rfloor` with
  :math:`h = \mathrm{mix}(\mathrm{mix}(i + a) \oplus b)`, :math:`i` its
  row-major index (mod :math:`2^{32}`) and :math:`a, b` hashed from the key's
  words. A few integer operations per element that fuse into the quantizer,
  in place of ``jax.random.uniform``'s threefry (faster on CPU,
  ``benchmarks/moment_store_parts.py``, :doc:`/results/design`).
  Not for cryptography or statistics beyond rounding.
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = jnp.ravel(key).astype(jnp.uint32)
  seed = jnp.uint32(0x9E3779B9)
  for i in range(words.size):
    seed = _mix32(seed ^ words[i])
  second = _mix32(seed + jnp.uint32(0x9E3779B9))
  index = jnp.arange(int(np.prod(shape, dtype=np.int64)), dtype=jnp.uint32).reshape(shape)
  h = _mix32(_mix32(index + seed) ^ second)
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def _encode(normalized: jax.Array, mapping: str, bits: int, key: jax.Array | None) -> jax.Array:
  """Code indices of ``normalized`` (values in the codebook's range), packed like :func:`quantize`.

  Nearest-value rounding when ``key`` is None; otherwise stochastic rounding
  between the two neighbouring codes, unbiased inside the codebook's range.
  Both searches go through :func:`code_search.sorted_search` (a bucket lookup,
  exact, faster than a binary search over 256 codes on XLA:CPU: :doc:`/results/design`).
  """
  table = _table(mapping, bits)
  if key is None:
    index = code_search.sorted_search((table[1:] + table[:-1]) / 2.0, normalized, "left")
  else:
    upper = jnp.clip(code_search.sorted_search(table, normalized, "right"), 1, table.size - 1)
    low_value = sharding.table_lookup(table, upper - 1, mode="clip")
    high_value = sharding.table_lookup(table, upper, mode="clip")
    p_upper = jnp.clip((normalized - low_value) / (high_value - low_value), 0.0, 1.0)
    index = jnp.where(rounding_uniform(key, normalized.shape) < p_upper, upper, upper - 1)
  codes = index.astype(jnp.uint8)
  if bits == 4:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, codes.shape[-1] % 2)])
    codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
  return codes


def store_moment(
    x: jax.Array, bits: int | None, kind: str = "first", *, key: jax.Array | None = None
) -> QuantizedMoment | jax.Array:
  """Stores a moment tensor in ``bits`` bits (see the module docstring for the schemes).

  Args:
    x: a real array; a ``"second"`` moment must be non-negative.
    bits: 8, 4, or None (float32).
    kind: ``"first"`` (signed: Adam's :math:`m`, momentum) or ``"second"``
      (non-negative: Adam's :math:`v`, Adagrad's sum of squares).
    key: a PRNG key for stochastic rounding (unbiased: an EMA quantized every
      step then still decays); None rounds to the nearest code.

  Returns:
    A :class:`QuantizedMoment`, or ``x`` as float32 when ``bits`` is None or
    ``x`` has fewer than :data:`MIN_QUANTIZED_SIZE` elements.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> stored = s4.moment_storage.store_moment(jnp.ones((64, 128)), bits=4, kind="second")
    >>> stored.codes.dtype, stored.codes.shape, stored.scales.shape  # rank-1: 64 row and 128 column maxima
    (dtype('uint8'), (64, 64), (192,))
    >>> float(s4.moment_storage.load_moment(stored).max())
    1.0
  """
  check_moment_bits("bits", bits)
  _check_kind(kind)
  x = jnp.asarray(x, jnp.float32)
  layout = moment_layout(x.shape, bits, kind)
  if layout is None or bits is None:  # (moment_layout gives None for bits=None)
    return x
  mapping, block = layout
  length = x.shape[-1]
  if block == RANK1:
    maxima = _axis_maxima(jnp.abs(x))
    scales = jnp.concatenate(maxima)
    normalizer = _rank1_normalizer(maxima)
    normalized = x / jnp.where(normalizer > 0, normalizer, 1.0)
  else:
    n_blocks = -(-length // block)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_blocks * block - length)])
    blocks = padded.reshape(x.shape[:-1] + (n_blocks, block))
    # The signed largest-magnitude value (the positive one on a tie): that element normalizes to +1, a code
    # of every codebook here (the signed dynamic tree has +1 but not -1). From the block's max and min: an
    # argmax and a gather cost 10x more on XLA:CPU.
    highest, lowest = jnp.max(blocks, axis=-1), jnp.min(blocks, axis=-1)
    scales = jnp.where(highest >= -lowest, highest, lowest)
    normalized = blocks / jnp.where(scales != 0, scales, 1.0)[..., None]
    normalized = normalized.reshape(padded.shape)[..., :length]
  if kind == "second":  # a positive value never gets the zero code
    table = _table(mapping, bits)
    normalized = jnp.where(x > 0, jnp.maximum(normalized, table[table > 0].min()), normalized)
  codes = _encode(normalized, mapping, bits, key)
  return QuantizedMoment(codes, scales, tuple(x.shape), kind, bits, mapping, block)


def load_moment(stored: QuantizedMoment | jax.Array) -> jax.Array:
  """The float32 moment of :func:`store_moment`'s output."""
  if not isinstance(stored, QuantizedMoment):
    return jnp.asarray(stored, jnp.float32)
  length = stored.shape[-1]
  if stored.block == RANK1:
    ones = jnp.ones(stored.shape[:-1] + (1,), jnp.float32)
    normalized = qz.dequantize(
        qz.QuantizedArray(stored.codes, ones, length, stored.mapping, stored.bits, _whole_rows(length)))
    maxima = jnp.split(stored.scales, np.cumsum(stored.shape)[:-1])
    return normalized * _rank1_normalizer(tuple(maxima))
  return qz.dequantize(
      qz.QuantizedArray(stored.codes, stored.scales, length, stored.mapping, stored.bits, stored.block))


# In a transform's state a moment is two trees shaped like the parameters: its codes (uint8, or the float32
# moment itself for a small tensor) and its scales (float32; a 0-d placeholder for a small tensor). Every
# leaf is one plain array, so the state survives frameworks that wrap each parameter-shaped leaf (flax.nnx.Optimizer);
# the static layout is recomputed from the gradient's shape (moment_layout).


def split_stored(stored: QuantizedMoment | jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(codes, scales)`` of a stored moment (a float32 moment and a 0-d placeholder when not quantized)."""
  if isinstance(stored, QuantizedMoment):
    return stored.codes, stored.scales
  return stored, jnp.zeros((), jnp.float32)  # a placeholder (orbax cannot save empty arrays)


def join_stored(codes: jax.Array, scales: jax.Array, shape: tuple[int, ...], bits: int, kind: str) -> Any:
  """Inverse of :func:`split_stored` for a moment of ``shape``."""
  layout = moment_layout(tuple(shape), bits, kind)
  if layout is None:
    return codes
  return QuantizedMoment(codes, scales, tuple(shape), kind, bits, *layout)


def init_moment_trees(params: Any, bits: int, kind: str, fill: jax.typing.ArrayLike = 0.0) -> tuple[Any, Any]:
  """(codes tree, scales tree) of a moment filled with ``fill``."""
  stored = [split_stored(store_moment(jnp.full(p.shape, fill, jnp.float32), bits, kind))
            for p in jax.tree.leaves(params)]
  treedef = jax.tree.structure(params)
  return treedef.unflatten([c for c, _ in stored]), treedef.unflatten([sc for _, sc in stored])


def store_moment_trees(values: Any, old_codes: Any, old_scales: Any, finite: Any, bits: int, kind: str,
                       key: jax.Array | None) -> tuple[Any, Any]:
  """Stores each float32 moment; a leaf whose ``finite`` is False keeps its old codes and scales.

  With a ``key``, leaf ``i`` rounds stochastically with ``fold_in(key, i)``.
  """
  treedef = jax.tree.structure(values)
  codes, scales = [], []
  for i, (value, old_c, old_s, ok) in enumerate(zip(*(treedef.flatten_up_to(t)
                                                      for t in (values, old_codes, old_scales, finite)))):
    leaf_key = None if key is None else jax.random.fold_in(key, i)
    new_c, new_s = split_stored(store_moment(value, bits, kind, key=leaf_key))
    new_c, new_s = sharding.laid_out_like(new_c, old_c), sharding.laid_out_like(new_s, old_s)
    codes.append(jnp.where(ok, new_c, old_c))
    scales.append(jnp.where(ok, new_s, old_s))
  return treedef.unflatten(codes), treedef.unflatten(scales)


def rounding_key(count: jax.Array, bits: int, kind: str) -> jax.Array | None:
  """The rounding key of a step: None (nearest) unless the scheme rounds stochastically.

  It depends only on the step count and the kind, so no key lives in the state
  and a run is reproducible.
  """
  if not SCHEMES[bits, kind].stochastic:
    return None
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), count), KINDS.index(kind))
