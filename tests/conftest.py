"""Makes the repository root importable, so tests can use ``benchmarks.model_shapes``.

Also gives the CPU backend 8 devices, for ``tests/test_sharding.py``. This has
to happen before JAX initializes a backend, and conftest.py is imported before
any test module. Every other test still runs on one device (the default device
is the first CPU device); measured, the rest of the suite takes the same CPU
time with 8 CPU devices as with 1.
"""

import pathlib
import sys

import jax

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

jax.config.update("jax_num_cpu_devices", 8)
