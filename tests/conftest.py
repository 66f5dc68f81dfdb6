"""Test setup: the repository root is importable (for ``benchmarks.model_shapes``),
so is ``tests/`` (the shared ``helpers`` and the ``reference_*`` transcriptions,
also for the tests in ``tests/integration/``), numpy's BLAS runs single-threaded,
and the CPU backend has 8 devices.

Layout: ``tests/test_<module>.py`` tests ``optax_shampoo4/<module>.py``;
``tests/integration/`` holds the tests that cross modules (training, examples,
docs, packaging, checkpoints, multi-process and multi-device runs, ...).

The 8 CPU devices are for the sharding tests; they must be set before
JAX initializes a backend, and conftest.py is imported before any test module.
Every other test still runs on one device (the default device is the first CPU
device); measured, the rest of the suite takes the same CPU time with 8 CPU
devices as with 1.
"""

import pathlib
import sys

import jax
import pytest

_TESTS = pathlib.Path(__file__).resolve().parent
for _path in (str(_TESTS.parent), str(_TESTS)):
  if _path not in sys.path:
    sys.path.insert(0, _path)

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


# Tests mark themselves slow where they are defined (``@pytest.mark.slow``, ``pytest.param(..., marks=...)``,
# ``helpers.sweep``/``helpers.mark_slow``). Doctests cannot carry a mark, so the long ones (each >= 6 s on a
# 2-core machine) are listed here by node id; the hook marks only such non-Python items. (The notebooks are
# executed by the docs build, ``tests/integration/test_docs.py``.)
SLOW_DOCTESTS = frozenset({
    "optax_shampoo4/state_utils.py::optax_shampoo4.state_utils.convert_state",
    "optax_shampoo4/soap.py::optax_shampoo4.soap.scale_by_soap4",
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  for item in items:
    if not isinstance(item, pytest.Function) and item.nodeid in SLOW_DOCTESTS:
      item.add_marker(pytest.mark.slow)
