"""Test setup: the repository root is importable (for ``benchmarks.model_shapes``),
numpy's BLAS runs single-threaded, and the CPU backend has 8 devices.

The 8 CPU devices are for ``tests/test_sharding.py``; they must be set before
JAX initializes a backend, and conftest.py is imported before any test module.
Every other test still runs on one device (the default device is the first CPU
device); measured, the rest of the suite takes the same CPU time with 8 CPU
devices as with 1.
"""

import pathlib
import sys

import jax
import pytest

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_blas():
  """OpenBLAS threads fight XLA's for a small machine's cores (float64 SVD/eigh
  at n = 256 get ~30x slower under load); the float64 references are small."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:  # optional: only a speed-up
    yield
    return
  with threadpool_limits(limits=1, user_api="blas"):
    yield
