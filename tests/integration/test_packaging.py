"""Release packaging as a new user meets it: ``python -m build`` makes a wheel and an sdist, ``twine check``
accepts their metadata, and the wheel installed into a fresh virtual environment runs a quickstart from a folder
outside the repository (so the installed package, not the checkout, is imported).

Slow (a fresh environment installs jax, optax and chex from the package index). Needs the ``release`` extra
(``pip install -e ".[release]"``: build, twine).
"""

import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]

QUICKSTART = textwrap.dedent("""
    import pathlib, sys
    import jax, jax.numpy as jnp, optax
    import optax_shampoo4 as s4

    package = pathlib.Path(s4.__file__).resolve().parent
    print("imported from", package)
    assert (package / "py.typed").exists()

    key_w, key_x = jax.random.split(jax.random.key(0))
    w_true = jax.random.normal(key_w, (16, 4))
    x = jax.random.normal(key_x, (256, 16))
    y = x @ w_true
    params = {"w": jnp.zeros((16, 4))}
    tx = s4.adamw_shampoo4(learning_rate=3e-2, stats_every=5, root_every=5, epsilon=1e-4)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      loss, grads = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(100):
      params, state, loss = step(params, state)
      losses.append(float(loss))
    print("loss", losses[0], "->", losses[-1])
    assert losses[-1] < 0.1 * losses[0]
    print("state bytes", s4.state_nbytes(state)["total"])
""")


def _run(args, **kwargs):
  result = subprocess.run(args, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
  return result


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
  pytest.importorskip("build", reason='the release extra is not installed: pip install -e ".[release]"')
  out = tmp_path_factory.mktemp("dist")
  _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)], timeout=900)
  wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
  return wheels[0], sdists[0]


def test_distributions_carry_license_types_and_metadata(dists):
  wheel, sdist = dists
  _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], timeout=300)
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  assert "optax_shampoo4/py.typed" in names
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
  assert "License-Expression: Apache-2.0" in metadata
  assert "Classifier: Typing :: Typed" in metadata
  with tarfile.open(sdist) as archive:
    members = archive.getnames()
  assert any(m.endswith("/LICENSE") for m in members)
  assert any(m.endswith("/optax_shampoo4/py.typed") for m in members)


def test_wheel_runs_the_quickstart_in_a_fresh_environment(dists, tmp_path):
  wheel, _ = dists
  # Outside the repository and without PYTHONPATH: neither pip nor Python may see the checkout (its metadata
  # would make pip skip the wheel as "already satisfied").
  env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
  workdir = tmp_path / "elsewhere"
  workdir.mkdir()
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)], cwd=workdir, env=env, timeout=300)
  python = venv / "bin" / "python"
  _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], cwd=workdir, env=env, timeout=1500)
  (workdir / "quickstart.py").write_text(QUICKSTART)
  result = _run([str(python), "quickstart.py"], cwd=workdir, env=env, timeout=600)
  imported_from = result.stdout.split("imported from ", 1)[1].split("\n", 1)[0]
  assert str(venv) in imported_from and str(ROOT) not in imported_from, result.stdout
