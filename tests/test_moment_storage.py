"""Tests of ``optax_shampoo4/moment_storage.py``: the 8- and 4-bit moment codebooks and round trips.

Round trips are compared with a numpy computation of the same scheme (block absmax or rank-1
normalization, nearest code) in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sweep

import optax_shampoo4 as s4

MS = s4.moment_storage
KEY = jax.random.PRNGKey(0)


def _numpy_table(mapping, bits):
  """Codebooks written independently of the library (bitsandbytes' construction, Li et al.'s linear)."""
  if mapping == "linear_unsigned_nonzero":
    return (np.arange(2**bits) + 1.0) / 2**bits
  signed = mapping == "dynamic_tree"
  values = [0.0, 1.0]
  for i in range(bits - 1):
    items = 2**i if signed else 2 ** (i + 1)
    edges = np.linspace(0.1, 1.0, items + 1)
    magnitudes = 10.0 ** (-(bits - 2) + i) * (edges[:-1] + edges[1:]) / 2
    values += list(magnitudes) + (list(-magnitudes) if signed else [])
  return np.sort(np.asarray(values))


def _nearest(normalized, table):
  return table[np.argmin(np.abs(normalized[..., None] - table), axis=-1)]


def _numpy_block(x, mapping, bits, block, positive_floor=False):
  """Block-absmax quantize + dequantize along the last axis, nearest code, in float64."""
  table = _numpy_table(mapping, bits)
  n = x.shape[-1]
  pad = -n % block
  blocks = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(x.shape[:-1] + (-1, block))
  scale = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)  # signed largest magnitude
  normalized = blocks / np.where(scale != 0, scale, 1)
  if positive_floor:
    normalized = np.where(blocks > 0, np.maximum(normalized, table[table > 0].min()), normalized)
  out = (_nearest(normalized, table) * scale).reshape(x.shape[:-1] + (-1,))[..., :n]
  return out, np.abs(np.broadcast_to(scale, blocks.shape)).reshape(x.shape[:-1] + (-1,))[..., :n]


def _numpy_rank1(v):
  """Li et al.'s rank-1 normalization + zero-free linear 4-bit code, nearest, in float64."""
  v = v.astype(np.float64)
  normalizer = np.minimum(v.max(1, keepdims=True), v.max(0, keepdims=True))
  normalized = v / np.where(normalizer > 0, normalizer, 1)
  return _nearest(normalized, _numpy_table("linear_unsigned_nonzero", 4)) * normalizer, normalizer


def _heavy_tailed(shape, seed, positive=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * np.exp(2 * rng.standard_normal(shape))
  return (x * x if positive else x).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Codebooks and round trips


@pytest.mark.parametrize("mapping", ["dynamic_tree", "dynamic_tree_unsigned", "linear_unsigned_nonzero"])
@pytest.mark.parametrize("bits", [4, 8])
def test_codebooks_match_independent_construction(mapping, bits):
  np.testing.assert_allclose(s4.quantization.codebook(mapping, bits), _numpy_table(mapping, bits), rtol=1e-6)


def test_unsigned_codebooks_spend_no_code_on_a_sign():
  for bits in (4, 8):
    unsigned = np.asarray(s4.quantization.codebook("dynamic_tree_unsigned", bits))
    signed = np.asarray(s4.quantization.codebook("dynamic_tree", bits))
    assert unsigned.min() == 0.0 and (signed > 0).sum() < (unsigned > 0).sum() == 2**bits - 1
    assert np.asarray(s4.quantization.codebook("linear_unsigned_nonzero", bits)).min() == 2.0**-bits


# (bits, kind) -> stated bound on |x_hat - x| / block absmax for nearest rounding (half the widest code gap).
BLOCK_BOUNDS = {(8, "first"): 0.00704, (8, "second"): 0.00352, (4, "first"): 0.1125}


@pytest.mark.parametrize("bits,kind", list(BLOCK_BOUNDS))
@sweep(0)
def test_block_round_trip_matches_numpy_within_stated_bound(bits, kind, seed):
  x = _heavy_tailed((48, 700), seed=bits + seed, positive=kind == "second")  # 700: a partial last block
  stored = MS.store_moment(x, bits, kind)
  scheme = MS.SCHEMES[bits, kind]
  assert isinstance(stored, MS.QuantizedMoment) and stored.block == scheme.block
  assert stored.codes.dtype == jnp.uint8 and stored.codes.shape == (48, 700 * bits // 8)
  got = np.asarray(MS.load_moment(stored))
  want, scale = _numpy_block(x, scheme.mapping, bits, scheme.block, positive_floor=kind == "second")
  # Ties: an x within float32 rounding of the midpoint of two codes may round to either (the library
  # normalizes in float32, the reference in float64); both codes are then equally near. Elsewhere: the same code.
  tie = np.abs(np.abs(got - x) - np.abs(want - x)) <= 4 * np.finfo(np.float32).eps * scale
  np.testing.assert_allclose(got[~tie], want[~tie], rtol=1e-6, atol=1e-30)  # float32 code * scale: <= eps
  assert np.mean(~np.isclose(got, want, rtol=1e-6, atol=1e-30)) < 1e-3  # ties are rare (1 in 33600, 20 seeds)
  error = np.abs(got - x) / scale
  assert error.max() <= BLOCK_BOUNDS[bits, kind] * (1 + 1e-5), error.max()


@pytest.mark.slow
def test_rank1_second_moment_round_trip_matches_numpy_within_stated_bound():
  v = _heavy_tailed((96, 301), seed=3, positive=True)
  stored = MS.store_moment(v, 4, "second")
  assert stored.block == MS.RANK1 and stored.codes.shape == (96, 151)
  assert stored.scales.shape == (96 + 301,)  # row maxima, then column maxima
  got = np.asarray(MS.load_moment(stored))
  want, normalizer = _numpy_rank1(v)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Values at least one code step up are within half a step (1/32 of min(r_i, c_j)); smaller ones are
  # raised to the first code (1/16), never lowered to 0.
  large = v >= normalizer / 16
  assert np.all(np.abs(got - v)[large] <= normalizer[np.broadcast_to(True, v.shape) & large] / 32 * (1 + 1e-6))
  assert np.all(got[~large] == pytest.approx(np.broadcast_to(normalizer, v.shape)[~large] / 16, rel=1e-6))


@pytest.mark.parametrize("bits", [pytest.param(4, marks=pytest.mark.slow), 8])
def test_second_moment_never_negative_and_positive_never_zero(bits):
  rng = np.random.default_rng(bits)
  v = _heavy_tailed((64, 256), seed=7, positive=True) * (rng.random((64, 256)) < 0.7)  # 30% exact zeros
  v[0, :5] = [1e-30, 1e-20, 1e-10, 1.0, 1e30]  # ~60 decades in one row (and block)
  for tensor in (v, v.reshape(-1)):  # rank-1 (4 bits) and block-wise
    for key in (None, KEY):
      got = np.asarray(MS.load_moment(MS.store_moment(tensor, bits, "second", key=key)))
      assert got.min() >= 0 and np.all(got[tensor > 0] > 0)
      if bits == 8:  # 4 bits: Li et al.'s zero-free codebook stores an exact 0 as 1/16 of its normalizer
        np.testing.assert_array_equal(got > 0, tensor > 0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["first", "second"])
def test_zeros_huge_and_tiny_values(bits, kind):
  zeros = jnp.zeros((64, 128))
  np.testing.assert_array_equal(MS.load_moment(MS.store_moment(zeros, bits, kind)), 0.0)
  rng = np.random.default_rng(0)
  x = rng.random((64, 128)).astype(np.float32) + 0.5
  if kind == "first":
    x *= np.sign(rng.standard_normal(x.shape))
  x[:32] *= 1e30
  x[32:] *= 1e-30
  got = np.asarray(MS.load_moment(MS.store_moment(x, bits, kind)))
  assert np.all(np.isfinite(got))
  relative = np.abs(got - x) / np.abs(x)  # values within [0.5, 1.5] x their row scale: tight everywhere
  assert relative.max() < (0.5 if bits == 4 else 0.03), relative.max()


def test_small_tensors_stay_float32():
  for shape in [(), (7,), (63, 65)]:  # 63 * 65 = 4095 < MIN_QUANTIZED_SIZE
    x = jnp.ones(shape, jnp.bfloat16)
    stored = MS.store_moment(x, 8, "first")
    assert not isinstance(stored, MS.QuantizedMoment) and stored.dtype == jnp.float32
  assert isinstance(MS.store_moment(jnp.ones((64, 64)), 8, "first"), MS.QuantizedMoment)


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbouring_code(bits):
  x = jnp.asarray(_heavy_tailed((32, 128), seed=11))
  keys = jax.random.split(KEY, 256)
  draws = jax.jit(jax.vmap(lambda k: MS.load_moment(MS.store_moment(x, bits, "first", key=k))))(keys)
  scheme = MS.SCHEMES[bits, "first"]
  _, scale = _numpy_block(np.asarray(x), scheme.mapping, bits, scheme.block)
  table = _numpy_table(scheme.mapping, bits)
  widest_gap = np.diff(table).max()
  assert np.all(np.abs(np.asarray(draws) - np.asarray(x)) <= widest_gap * scale * (1 + 1e-6))
  mean = np.asarray(draws.mean(0))
  stderr = widest_gap * scale / 2 / np.sqrt(len(keys))
  assert np.mean(np.abs(mean - np.asarray(x)) <= 4 * stderr) > 0.999
