"""Block-wise absmax quantization with 3-, 4- and 8-bit codebooks, and 16-bit uniform codes.

A vector ``x`` of length ``n`` is cut into blocks of ``block`` consecutive
elements along its last axis (the last block is zero-padded). Each block keeps
one float32 scale :math:`s = \\max_i |x_i|` and one code per element,

.. math::

  q_i = \\operatorname{argmin}_j \\left| x_i / s - R(j) \\right|, \\qquad
  \\hat x_i = R(q_i) \\, s,

where :math:`R` is a sorted codebook of :math:`2^b` values in :math:`[-1, 1]`
that contains 0 (so padding and all-zero blocks are exact). 4-bit codes are
packed two per ``uint8``, the even element in the low nibble. 3-bit codes are
packed eight per three bytes (a *group*): codes :math:`c_0, \\dots, c_7` form
the 24-bit little-endian word :math:`w = \\sum_k c_k 2^{3k}` and byte
:math:`j` of the group is :math:`\\lfloor w / 2^{8j} \\rfloor \\bmod 256`, i.e.

====  =====================================================
byte  bits 7 … 0
====  =====================================================
0     ``c2[1:0] c1[2:0] c0[2:0]``
1     ``c5[0] c4[2:0] c3[2:0] c2[2]``
2     ``c7[2:0] c6[2:0] c5[2:1]``
====  =====================================================

Packing is done per row, and each row is padded (with the code of 0) to an
even length (4 bits) or a multiple of 8 codes (3 bits), so a byte never holds
codes of two rows (the official CUDA kernels race on odd orders; this layout
cannot). Scale blocks and packing groups are independent: a row is unpacked
whole before its scales are applied, so a 3-bit block need not be a multiple
of 8.

16-bit codes (``mapping="linear"`` only; used for the few most precise rows of
an eigenvector matrix, :func:`quantize_split_rows`) have no codebook: the
uniform grid :math:`R(j) = j / 32767`, :math:`j = -32767, \\dots, 32767`, so
the rounding error is at most :math:`s / 65534` (:data:`WIDE_LEVELS`). The
code :math:`j + 32767` is kept as two ``uint8``, low byte first, so every
code array of a state stays ``uint8``.

References:
  Wang et al., `4-bit Shampoo for Memory-Efficient Network Training
  <https://arxiv.org/abs/2405.18144>`_, NeurIPS 2024 (§3.3, App. C).
  Dettmers et al., `8-bit Optimizers via Block-wise Quantization
  <https://arxiv.org/abs/2110.02861>`_, ICLR 2022 (dynamic tree codebook).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_shampoo4 import code_search, sharding

MAPPINGS = ("linear2", "dynamic_tree", "linear")
BITS = (3, 4, 8)
WIDE_BITS = 16  # uniform codes without a codebook (mapping "linear"), two bytes each
WIDE_LEVELS = 32767  # 16-bit codes hold j / WIDE_LEVELS, |j| <= WIDE_LEVELS
GROUP_CODES = 8  # 3-bit codes per packed group
GROUP_BYTES = 3  # bytes per packed group of 3-bit codes
# Unsigned codebooks in [0, 1] for non-negative arrays (second moments): no code is spent on a sign.
MAPPINGS += ("dynamic_tree_unsigned", "linear_unsigned_nonzero")


def _linear_power_codebook(bits: int, power: int) -> np.ndarray:
  """sign(v)|v|^power with v = linspace(-1, 1, 2**bits) and v[2**(b-1)-1] = 0."""
  values = np.linspace(-1.0, 1.0, 2**bits)
  values[2 ** (bits - 1) - 1] = 0.0
  return np.sign(values) * np.abs(values) ** power


def _dynamic_tree_codebook(bits: int) -> np.ndarray:
  """Signed dynamic tree map (bitsandbytes construction, exponent bits b-1).

  :math:`\\{0, 1\\} \\cup \\{\\pm q\\}`: for :math:`E = 0, \\dots, b-2` leading
  zero bits and :math:`F = b-2-E` fraction bits, the :math:`2^F` midpoints of
  ``linspace(0.1, 1, 2**F + 1)`` times :math:`10^{-E}`. It does not degenerate
  at 3 bits: :math:`\\{0, 1, \\pm 0.055, \\pm 0.325, \\pm 0.775\\}`, 8 distinct
  values (no -1, as at 4 and 8 bits).
  """
  exponent_bits = bits - 1
  values = [0.0, 1.0]
  for i in range(exponent_bits):
    boundaries = np.linspace(0.1, 1.0, 2**i + 1)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    magnitude = 10.0 ** (-(exponent_bits - 1) + i) * means
    values.extend(magnitude.tolist())
    values.extend((-magnitude).tolist())
  return np.asarray(values)


def _unsigned_codebook(mapping: str, bits: int) -> np.ndarray:
  """Codebooks in [0, 1] for non-negative arrays.

  ``"dynamic_tree_unsigned"``: bitsandbytes' unsigned dynamic map (0, 1 and,
  for i < b - 1, 2**(i+1) means of linspace(0.1, 1) scaled by 10**(i - b + 2)).
  ``"linear_unsigned_nonzero"``: (j + 1) / 2**b, j < 2**b, with no zero (Li et
  al. 2023: a second moment rounded to 0 makes 1/sqrt(v) explode).
  """
  if mapping == "linear_unsigned_nonzero":
    return np.arange(1, 2**bits + 1) / 2.0**bits
  values = [0.0, 1.0]
  for i in range(bits - 1):
    boundaries = np.linspace(0.1, 1.0, 2 ** (i + 1) + 1)
    values.extend((10.0 ** (i - bits + 2) * (boundaries[:-1] + boundaries[1:]) / 2.0).tolist())
  return np.asarray(values)


def validate_mapping_bits(mapping: str, bits: int, wide: bool = False) -> None:
  """Raises ValueError unless ``mapping`` and ``bits`` name a codebook (or, with ``wide``, are
  ``("linear", 16)``: the uniform 16-bit codes)."""
  if mapping not in MAPPINGS:
    raise ValueError(f"mapping must be one of {MAPPINGS}, got mapping={mapping!r}")
  allowed = BITS + (WIDE_BITS,) if wide else BITS
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in allowed:
    raise ValueError(f"bits must be one of {allowed}, got bits={bits!r}")
  if bits == WIDE_BITS and mapping != "linear":
    raise ValueError(f"bits=16 (the uniform grid) needs mapping='linear', got mapping={mapping!r}")


@functools.lru_cache(maxsize=None)
def _codebook_numpy(mapping: str, bits: int) -> np.ndarray:
  if mapping == "linear2":
    values = _linear_power_codebook(bits, 2)
  elif mapping == "linear":
    values = _linear_power_codebook(bits, 1)
  elif mapping in ("dynamic_tree_unsigned", "linear_unsigned_nonzero"):
    values = _unsigned_codebook(mapping, bits)
  else:
    values = _dynamic_tree_codebook(bits)
  values = np.sort(values.astype(np.float32))
  assert values.shape == (2**bits,) and np.unique(values).size == 2**bits
  values.setflags(write=False)
  return values


def codebook(mapping: str = "linear2", bits: int = 4) -> jax.Array:
  """The sorted codebook :math:`R` of ``2**bits`` float32 values.

  Args:
    mapping: ``"linear2"`` (:math:`\\mathrm{sign}(v) v^2`, the paper's
      default), ``"dynamic_tree"`` (bitsandbytes' dynamic tree) or ``"linear"``
      (:math:`v`), with :math:`v` = ``linspace(-1, 1, 2**bits)`` and the entry
      at index ``2**(bits-1) - 1`` set to 0; for non-negative arrays,
      ``"dynamic_tree_unsigned"`` (bitsandbytes' unsigned map, in [0, 1]) or
      ``"linear_unsigned_nonzero"`` (:math:`(j+1)/2^b`, no zero).
    bits: 3, 4 or 8.

  Returns:
    ``f32[2**bits]``, sorted ascending, containing 0.

  Example:
    >>> import optax_shampoo4 as s4
    >>> [round(float(v), 4) for v in s4.quantization.codebook("linear2", 4)[6:9]]
    [-0.04, 0.0, 0.0044]
  """
  validate_mapping_bits(mapping, bits)
  return jnp.asarray(_codebook_numpy(mapping, bits))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["length", "mapping", "bits", "block"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A block-quantized array: a pytree of ``codes`` and ``scales``.

  Attributes:
    codes: ``uint8[..., 3 * ceil(length / 8)]`` for 3 bits (eight codes in
      three bytes, see the module docstring), ``uint8[..., ceil(length / 2)]``
      for 4 bits (two codes a byte, low nibble first),
      ``uint8[..., length]`` for 8 bits or ``uint8[..., 2 * length]`` for 16
      bits (two bytes a code, low byte first).
    scales: ``f32[..., ceil(length / block)]``, the absmax of each block.
    length: the size of the last axis of the original array (static).
    mapping: the codebook name (static).
    bits: 3, 4, 8 or 16 (static).
    block: elements per scale (static).
  """

  codes: jax.Array
  scales: jax.Array
  length: int
  mapping: str
  bits: int
  block: int

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the dequantized array."""
    return tuple(self.scales.shape[:-1]) + (self.length,)


def validate_block(block: int, bits: int, name: str = "block") -> None:
  """Raises ValueError unless ``block`` is a valid block size for ``bits``.

  Any int >= 2; even for 4 bits (rows are quantized in whole blocks and then
  paired into bytes). 3-bit rows are cut to their length and padded to whole
  groups of 8 codes independently of the blocks, so any block >= 2 works.
  """
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 2:
    raise ValueError(f"{name} must be an integer >= 2, got {name}={block!r}")
  if bits == 4 and block % 2:
    raise ValueError(f"{name} must be even for 4-bit codes, got {name}={block!r}")


def packed_length(length: int, bits: int) -> int:
  """Bytes of one packed row of ``length`` codes at ``bits`` bits."""
  if bits == 3:
    return GROUP_BYTES * -(-length // GROUP_CODES)
  if bits == 4:
    return -(-length // 2)
  if bits == WIDE_BITS:
    return 2 * length
  return length


def _num_blocks(length: int, block: int) -> int:
  return -(-length // block)


def _pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8[..., 2k] codes < 16 -> uint8[..., k]; element 2i in the low nibble."""
  pairs = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2))
  return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack_nibbles(packed: jax.Array) -> jax.Array:
  """Inverse of :func:`_pack_nibbles`."""
  pairs = jnp.stack([packed & 0x0F, packed >> 4], axis=-1)
  return pairs.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def _pack_wide(codes: jax.Array) -> jax.Array:
  """uint16-valued int32 codes ``[..., n]`` -> uint8[..., 2n], each code's low byte first."""
  pairs = jnp.stack([codes & 0xFF, codes >> 8], axis=-1).astype(jnp.uint8)
  return pairs.reshape(codes.shape[:-1] + (2 * codes.shape[-1],))


def _unpack_wide(packed: jax.Array) -> jax.Array:
  """Inverse of :func:`_pack_wide`, as int32."""
  pairs = packed.reshape(packed.shape[:-1] + (packed.shape[-1] // 2, 2)).astype(jnp.int32)
  return pairs[..., 0] | (pairs[..., 1] << 8)


_SHIFTS_3BIT = np.arange(GROUP_CODES, dtype=np.uint32) * 3


def _pack_3bit(codes: jax.Array) -> jax.Array:
  """uint8[..., 8k] codes < 8 -> uint8[..., 3k]; see the module docstring."""
  groups = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // GROUP_CODES, GROUP_CODES))
  words = jnp.sum(groups.astype(jnp.uint32) << _SHIFTS_3BIT, axis=-1, dtype=jnp.uint32)
  packed = jnp.stack([(words >> (8 * j)) & 0xFF for j in range(GROUP_BYTES)], axis=-1)
  return packed.astype(jnp.uint8).reshape(codes.shape[:-1] + (GROUP_BYTES * groups.shape[-2],))


def _unpack_3bit(packed: jax.Array) -> jax.Array:
  """Inverse of :func:`_pack_3bit`."""
  groups = packed.reshape(packed.shape[:-1] + (packed.shape[-1] // GROUP_BYTES, GROUP_BYTES))
  groups = groups.astype(jnp.uint32)
  words = groups[..., 0] | (groups[..., 1] << 8) | (groups[..., 2] << 16)
  codes = (words[..., None] >> _SHIFTS_3BIT) & 0x7
  return codes.astype(jnp.uint8).reshape(packed.shape[:-1] + (GROUP_CODES * groups.shape[-2],))


def quantize(
    x: jax.Array, mapping: str = "linear2", bits: int = 4, block: int = 64
) -> QuantizedArray:
  """Quantizes ``x`` block-wise along its last axis.

  Args:
    x: a float array ``[..., n]`` with ``n >= 1``; computed in float32.
    mapping: codebook name, see :func:`codebook` (``"linear"`` for 16 bits).
    bits: 3, 4, 8, or 16 (uniform codes, see the module docstring).
    block: elements per absmax scale (even for 4 bits), see
      :func:`validate_block`.

  Returns:
    A :class:`QuantizedArray`; :func:`dequantize` gives back ``[..., n]``.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> q = s4.quantization.quantize(jnp.eye(3), block=2)
    >>> q.codes.dtype, q.codes.shape, q.scales.shape
    (dtype('uint8'), (3, 2), (3, 2))
    >>> s4.quantization.dequantize(q).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
  """
  validate_mapping_bits(mapping, bits, wide=True)
  validate_block(block, bits)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a real floating-point array, got dtype {x.dtype}")
  if x.ndim < 1 or x.shape[-1] < 1:
    raise ValueError(f"x must have a non-empty last axis, got shape {x.shape}")
  length = x.shape[-1]
  n_blocks = _num_blocks(length, block)
  x = x.astype(jnp.float32)
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_blocks * block - length)])
  blocks = padded.reshape(x.shape[:-1] + (n_blocks, block))
  scales = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(scales > 0, scales, 1.0)
  normalized = blocks / safe[..., None]
  if bits == WIDE_BITS:
    wide = jnp.round(normalized * WIDE_LEVELS).astype(jnp.int32) + WIDE_LEVELS
    codes = _pack_wide(wide.reshape(x.shape[:-1] + (n_blocks * block,))[..., :length])
    return QuantizedArray(codes, scales, length, mapping, bits, block)
  table = _codebook_numpy(mapping, bits)
  # The nearest code: how many midpoints between codes lie below the value (a bucket lookup, exact; no
  # while loop, which in an untaken refresh branch would slow every step on XLA:CPU).
  codes = code_search.sorted_search((table[1:] + table[:-1]) / 2.0, normalized, "left").astype(jnp.uint8)
  codes = codes.reshape(x.shape[:-1] + (n_blocks * block,))
  if bits == 4:
    codes = _pack_nibbles(codes)[..., : -(-length // 2)]
  elif bits == 3:
    group_len = GROUP_CODES * -(-length // GROUP_CODES)
    zero_code = int(np.flatnonzero(table == 0.0)[0])
    codes = jnp.pad(codes[..., :length], [(0, 0)] * (codes.ndim - 1) + [(0, group_len - length)],
                    constant_values=zero_code)
    codes = _pack_3bit(codes)
  else:
    codes = codes[..., :length]
  return QuantizedArray(codes, scales, length, mapping, bits, block)


def dequantize(q: QuantizedArray) -> jax.Array:
  """Float32 values of a :class:`QuantizedArray`, shape ``[..., length]``."""
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"q must be a QuantizedArray (from quantize), got {type(q).__name__}")
  n_blocks = q.scales.shape[-1]
  padded_len = n_blocks * q.block
  if q.bits == WIDE_BITS:
    codes = _unpack_wide(q.codes)
  elif q.bits == 4:
    codes = _unpack_nibbles(q.codes)
  elif q.bits == 3:
    codes = _unpack_3bit(q.codes)
  else:
    codes = q.codes
  codes = codes[..., : q.length]
  codes = jnp.pad(
      codes, [(0, 0)] * (codes.ndim - 1) + [(0, padded_len - codes.shape[-1])]
  )
  if q.bits == WIDE_BITS:
    values = (codes - WIDE_LEVELS).astype(jnp.float32) / WIDE_LEVELS
  else:
    values = sharding.table_lookup(codebook(q.mapping, q.bits), codes.astype(jnp.int32))
  values = values.reshape(q.scales.shape + (q.block,)) * q.scales[..., None]
  return values.reshape(q.scales.shape[:-1] + (padded_len,))[..., : q.length]


class OffDiagQuantized(NamedTuple):
  """A square matrix stored as an fp32 diagonal plus a quantized off-diagonal.

  The diagonal is set to zero before the block absmax is taken, so large
  diagonal entries do not swamp the off-diagonal scales (the paper's
  ``(a, Q(A - Diag(a)))``).
  """

  diag: jax.Array  # f32[..., n]
  offdiag: QuantizedArray  # rows of the matrix with a zero diagonal


def quantize_offdiag(
    m: jax.Array, mapping: str = "linear2", bits: int = 4, block: int = 64
) -> OffDiagQuantized:
  """Stores square ``m`` ``[..., n, n]`` as fp32 diag + quantized off-diagonal."""
  m = jnp.asarray(m, jnp.float32)
  if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
    raise ValueError(f"m must be square in its last two axes, got shape {m.shape}")
  diag = jnp.diagonal(m, axis1=-2, axis2=-1)
  eye = jnp.eye(m.shape[-1], dtype=bool)
  offdiag = quantize(jnp.where(eye, 0.0, m), mapping, bits, block)
  return OffDiagQuantized(diag, offdiag)


def dequantize_offdiag(stored: OffDiagQuantized) -> jax.Array:
  """The float32 matrix of an :class:`OffDiagQuantized`."""
  offdiag = dequantize(stored.offdiag)
  n = offdiag.shape[-1]
  return jnp.where(jnp.eye(n, dtype=bool), stored.diag[..., None, :], offdiag)


class SplitRowsQuantized(NamedTuple):
  """A matrix whose first rows are stored in more bits than the rest.

  For eigenvector matrices kept one eigenvector a row in descending eigenvalue
  order: the ``head`` rows (largest eigenvalues) in ``head.bits`` bits, the
  ``tail`` rows in ``tail.bits``. The head may itself be split (a 16-bit head,
  then 8-bit rows): :func:`row_tiers` lists the parts, most precise first.
  See :func:`quantize_split_rows`.
  """

  head: QuantizedArray | SplitRowsQuantized  # rows [..., :r, :]
  tail: QuantizedArray  # rows [..., r:, :]


def quantize_split_rows(
    m: jax.Array, head_rows: int, head_bits: int = 8, mapping: str = "linear2", bits: int = 4, block: int = 64,
    mid_rows: int = 0, mid_bits: int = 8,
) -> SplitRowsQuantized:
  """Stores ``m`` ``[..., n, n]`` with rows ``[:head_rows]`` in ``head_bits`` bits, the rest in ``bits``.

  ``head_bits`` is 8 (``mapping``'s codebook) or 16 (the uniform 16-bit codes,
  whatever ``mapping`` is); ``mapping`` and ``bits`` are the tail's. With
  ``mid_rows`` > 0 the ``mid_rows`` rows after the head are a second tier in
  ``mid_bits`` bits (``mapping``'s codebook), kept as a split head.

  Example:
    >>> import jax.numpy as jnp, optax_shampoo4 as s4
    >>> s = s4.quantization.quantize_split_rows(jnp.eye(4), head_rows=1, block=2)
    >>> s.head.codes.shape, s.tail.codes.shape  # one row of 8-bit codes, three rows of packed 4-bit codes
    ((1, 4), (3, 2))
    >>> s4.quantization.dequantize_split_rows(s).tolist() == jnp.eye(4).tolist()
    True
    >>> tiers = s4.quantization.quantize_split_rows(jnp.eye(4), 1, 16, block=2, mid_rows=1)
    >>> [t.bits for t in s4.quantization.row_tiers(tiers)]
    [16, 8, 4]
  """
  m = jnp.asarray(m, jnp.float32)
  n = m.shape[-2] if m.ndim >= 2 else 0
  if m.ndim < 2 or not 0 < head_rows < n:
    raise ValueError(f"head_rows must be in (0, {n}), got head_rows={head_rows!r}")
  if not 0 <= mid_rows < n - head_rows:
    raise ValueError(f"mid_rows must be in [0, {n - head_rows}), got mid_rows={mid_rows!r}")
  head_mapping = "linear" if head_bits == WIDE_BITS else mapping
  head = quantize(m[..., :head_rows, :], head_mapping, head_bits, block)
  if mid_rows:
    head = SplitRowsQuantized(head, quantize(m[..., head_rows:head_rows + mid_rows, :], mapping, mid_bits, block))
  return SplitRowsQuantized(head, quantize(m[..., head_rows + mid_rows:, :], mapping, bits, block))


def row_tiers(stored: SplitRowsQuantized) -> list[QuantizedArray]:
  """The parts of a :class:`SplitRowsQuantized`, top rows (most precise) first."""
  head = row_tiers(stored.head) if isinstance(stored.head, SplitRowsQuantized) else [stored.head]
  return head + [stored.tail]


def dequantize_split_rows(stored: SplitRowsQuantized) -> jax.Array:
  """The float32 matrix of a :class:`SplitRowsQuantized`."""
  return jnp.concatenate([dequantize(part) for part in row_tiers(stored)], axis=-2)
