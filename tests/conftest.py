"""Test setup: the repository root is importable (for ``benchmarks.model_shapes``),
and numpy's BLAS runs single-threaded."""

import pathlib
import sys

import pytest

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


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
