"""Tests for the bucket-lookup codebook search and the counter-based rounding bits.

``code_search.sorted_search`` must equal a searchsorted for every float32 input (compared against
``jnp.searchsorted`` under the same jit, so both see the backend's comparison semantics, and against
float64 NumPy on normal floats); ``moment_storage.rounding_uniform`` must look uniform and independent
across elements and keys.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_shampoo4 import code_search
from optax_shampoo4 import moment_storage as ms
from optax_shampoo4 import quantization as qz

CODEBOOKS = [("dynamic_tree", 8), ("dynamic_tree_unsigned", 8), ("linear2", 8), ("linear", 8),
             ("dynamic_tree", 4), ("linear2", 4), ("linear_unsigned_nonzero", 4), ("linear2", 3)]


def _tables(mapping, bits):
  table = np.asarray(qz.codebook(mapping, bits), np.float32)
  return {"codes": table, "midpoints": ((table[1:] + table[:-1]) / 2.0).astype(np.float32)}


def _probe_values(table: np.ndarray) -> np.ndarray:
  rng = np.random.default_rng(0)
  tiny = np.finfo(np.float32).tiny
  special = [0.0, -0.0, 1e-45, -1e-45, 1e-39, -1e-39, tiny, -tiny, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0,
             1e30, -1e30, np.inf, -np.inf]
  parts = [rng.uniform(-1.1, 1.1, 50_000), table, np.nextafter(table, np.float32(np.inf)),
           np.nextafter(table, np.float32(-np.inf)), special,
           np.sign(rng.normal(size=50_000)) * 10.0 ** rng.uniform(-44, 0.4, 50_000)]
  return np.concatenate([np.asarray(p, np.float32) for p in parts])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mapping,bits", CODEBOOKS)
def test_sorted_search_equals_searchsorted(mapping, bits, side):
  for name, table in _tables(mapping, bits).items():
    x = _probe_values(table)
    ours = np.asarray(jax.jit(lambda v, t=table: code_search.sorted_search(t, v, side))(x))
    theirs = np.asarray(jax.jit(
        lambda v, t=table: jnp.searchsorted(jnp.asarray(t), v, side=side, method="scan_unrolled"))(x))
    np.testing.assert_array_equal(ours, theirs, err_msg=f"{mapping} {bits} {name} {side}")
    normal = np.abs(x) >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(ours[normal], np.searchsorted(table.astype(np.float64),
                                                                x[normal].astype(np.float64), side))
    assert ours.dtype == np.int32


@pytest.mark.parametrize("mapping,bits", [m for m in CODEBOOKS if m[1] == 8])
def test_256_code_tables_need_at_most_two_comparisons(mapping, bits):
  # The premise of the lookup's speed: one gathered count and <= 2 comparisons per element.
  for table in _tables(mapping, bits).values():
    for side in ("left", "right"):
      plan = code_search._plan(table.tobytes(), side)
      assert plan.window <= 2 and len(plan.counts) <= 20_000


def test_sorted_search_rejects_bad_arguments():
  with pytest.raises(ValueError, match="side"):
    code_search.sorted_search(np.array([0.0, 1.0], np.float32), jnp.zeros(3), side="middle")
  with pytest.raises(ValueError, match="sorted"):
    code_search.sorted_search(np.array([1.0, 0.0], np.float32), jnp.zeros(3))
  with pytest.raises(ValueError, match="sorted"):
    code_search.sorted_search(np.array([0.0, np.nan], np.float32), jnp.zeros(3))


def test_rounding_uniform_is_uniform_and_independent():
  shape = (256, 1024)
  key = jax.random.PRNGKey(3)
  u = np.asarray(jax.jit(lambda k: ms.rounding_uniform(k, shape))(key), np.float64)
  assert u.shape == shape and u.min() >= 0.0 and u.max() < 1.0
  n = u.size
  assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
  assert abs(u.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / n)
  counts = np.histogram(u, bins=256, range=(0, 1))[0]
  chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
  assert chi2 < 255 + 6 * np.sqrt(2 * 255)  # chi-square, 255 degrees of freedom
  flat = u.ravel() - 0.5
  for lag in (1, 2, 1024):  # neighbours along a row, and along a column
    assert abs(np.mean(flat[:-lag] * flat[lag:]) * 12) < 4 / np.sqrt(n)
  # Consecutive step keys and streams folded from one key are uncorrelated, and a key is reproducible.
  others = [jax.random.fold_in(key, 1), ms.rounding_key(jnp.int32(7), 8, "first"),
            ms.rounding_key(jnp.int32(8), 8, "first"), ms.rounding_key(jnp.int32(7), 8, "second")]
  streams = [np.asarray(ms.rounding_uniform(k, shape), np.float64).ravel() - 0.5 for k in others]
  for i, a in enumerate([flat] + streams):
    for b in streams[i:]:
      if a is not b:
        assert abs(np.mean(a * b) * 12) < 4 / np.sqrt(n)
  np.testing.assert_array_equal(np.asarray(ms.rounding_uniform(key, shape)), u.astype(np.float32))
  typed = jax.random.wrap_key_data(key)
  np.testing.assert_array_equal(np.asarray(ms.rounding_uniform(typed, shape)), u.astype(np.float32))
