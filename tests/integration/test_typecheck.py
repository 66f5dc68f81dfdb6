"""The package type-checks clean: pyright in basic mode (configured in pyproject.toml's ``[tool.pyright]``) on
``optax_shampoo4/``, against the installed jax, optax and chex.

Slow (pyright starts Node.js and reads the dependencies' stubs). Needs the ``typecheck`` extra
(``pip install -e ".[typecheck]"``); the pyright package uses the ``node`` on PATH, or installs Node.js once.
"""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_pyright_basic_mode_reports_no_errors():
  pytest.importorskip("pyright", reason='the typecheck extra is not installed: pip install -e ".[typecheck]"')
  command = [sys.executable, "-m", "pyright", "--pythonpath", sys.executable, "optax_shampoo4"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  output = result.stdout + result.stderr
  assert result.returncode == 0, f"pyright found errors:\n{output[-10000:]}"
  assert "0 errors" in output, output[-2000:]
