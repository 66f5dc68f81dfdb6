"""Every optimizer and state format reproduces its recorded trajectory bit for bit.

A refactoring check: ``tests/data/arch_baseline.json`` holds, for each
configuration of :data:`CONFIGS`, a SHA-256 digest of every step's update and
of the final state (leaf bytes, shapes and dtypes, in tree order), recorded by
running this file as a script::

  python tests/integration/test_bit_identical.py   # rewrites tests/data/arch_baseline.json

The test reruns the same 30 steps (statistics, roots and bases refreshed many
times, one non-finite gradient) and asserts the digests are equal: any change
of arithmetic, operation order or state layout fails it. Bit equality holds
only for the same jax/jaxlib build on the same kind of CPU, so the test skips
when the recorded versions or machine differ (re-record with the command above
after a deliberate numerical change).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import pytest

import optax_shampoo4 as s4

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "data" / "arch_baseline.json"
STEPS = 30
NONFINITE_STEP = 17  # this step's gradient holds a NaN (failure counters, skipped refreshes)

# Small blocks and quantization thresholds so that every path runs on a small tree.
SHAMPOO = dict(max_order=32, min_quant_order=16, quant_block=16, stats_every=2, root_every=5)
STORED_ROOT = dict(store_root=True, bjorck_steps=(1, 4))
SOAP = dict(precondition_every=3, max_order=32, min_quant_order=16, quant_block=16)


def _shampoo(**kw):
  return optax.chain(s4.scale_by_shampoo4(**{**SHAMPOO, **kw}), optax.scale_by_learning_rate(1e-2))


def _soap(**kw):
  return optax.chain(s4.scale_by_soap4(**{**SOAP, **kw}), optax.scale_by_learning_rate(1e-2))


CONFIGS = {
    "shampoo_eigen": lambda: _shampoo(),
    "shampoo_eigen_bits3": lambda: _shampoo(bits=3),
    "shampoo_eigen_bits8": lambda: _shampoo(bits=8),
    "shampoo_eigen_newton": lambda: _shampoo(root_method="newton"),
    "shampoo_eigen_qr": lambda: _shampoo(refresh_method="qr"),
    "shampoo_eigen_qr2": lambda: _shampoo(refresh_method="qr", qr_iterations=2),
    "shampoo_eigen_eigh": lambda: _shampoo(refresh_method="eigh"),
    "shampoo_eigen_adaptive0": lambda: _shampoo(refresh_tol=0.0),
    "shampoo_eigen_dynamic_tree": lambda: _shampoo(mapping="dynamic_tree", bits=8),
    "shampoo_eigen_linear": lambda: _shampoo(mapping="linear"),
    "shampoo_store_root_false": lambda: _shampoo(store_root=False),
    "shampoo_naive": lambda: _shampoo(state_format="naive"),
    "shampoo_naive_bits3": lambda: _shampoo(state_format="naive", bits=3),
    "shampoo_naive_bits8": lambda: _shampoo(state_format="naive", bits=8),
    "shampoo_fp32": lambda: _shampoo(state_format="fp32"),
    "shampoo_quant_damping": lambda: _shampoo(epsilon=1e-12, epsilon_mode="absolute", quant_damping=1e-6),
    "shampoo_jorge_naive": lambda: _shampoo(state_format="naive", root_method="jorge"),
    "shampoo_jorge_fp32": lambda: _shampoo(state_format="fp32", root_method="jorge"),
    "shampoo_caspr_eigen": lambda: _shampoo(combine="caspr"),
    "shampoo_caspr_fp32": lambda: _shampoo(combine="caspr", state_format="fp32"),
    "shampoo_caspr_naive": lambda: _shampoo(combine="caspr", state_format="naive"),
    "shampoo_graft_sgd": lambda: _shampoo(grafting="sgd"),
    "shampoo_graft_adagrad": lambda: _shampoo(grafting="adagrad", grafting_eps=1e-8),
    "shampoo_graft_rmsprop": lambda: _shampoo(grafting="rmsprop", grafting_per_block=False),
    "shampoo_graft_adam_filter": lambda: _shampoo(grafting="adam", filter_beta=0.9, start_preconditioning_step=7),
    "shampoo_filter_nobias": lambda: _shampoo(filter_beta=0.9, filter_bias_correction=False,
                                              grafting_per_block=True),
    "soap_eigen": lambda: _soap(),
    "soap_eigen_bits8": lambda: _soap(bits=8),
    "soap_eigen_bits3": lambda: _soap(bits=3),
    "soap_no_head": lambda: _soap(head_fraction=0.0),
    "soap_head_quarter": lambda: _soap(head_fraction=0.25),
    "soap_head8_no_mid": lambda: _soap(head_bits=8, mid_fraction=0.0),
    "soap_fp32": lambda: _soap(state_format="fp32"),
    "soap_moment_bits8": lambda: _soap(moment_bits=8),
    "soap_moment_bits4": lambda: _soap(moment_bits=4),
    "soap_project_nu_false": lambda: _soap(project_nu=False),
    "soap_tail_qr": lambda: _soap(tail_rectify="qr"),
    "soap_tail_qr_every_step": lambda: _soap(tail_rectify="qr_every_step"),
    "soap_max_precond_dim": lambda: _soap(max_precond_dim=40, shampoo_beta=0.9, bjorck_steps=(2, 0)),
    "adamw_shampoo4": lambda: s4.adamw_shampoo4(1e-3, weight_decay=1e-2, **SHAMPOO),
    "adamw_shampoo4_m8": lambda: s4.adamw_shampoo4(1e-3, weight_decay=1e-2, moment_bits=8, **SHAMPOO),
    "adamw_shampoo4_m4": lambda: s4.adamw_shampoo4(1e-3, weight_decay=1e-2, moment_bits=4, **SHAMPOO),
    "sgdm_shampoo4": lambda: s4.sgdm_shampoo4(0.1, nesterov=True, weight_decay=1e-3, **SHAMPOO),
    "sgdm_shampoo4_m8": lambda: s4.sgdm_shampoo4(0.1, moment_bits=8, **SHAMPOO),
    "adagrad_shampoo4": lambda: s4.adagrad_shampoo4(1e-2, **SHAMPOO),
    "adagrad_shampoo4_m4": lambda: s4.adagrad_shampoo4(1e-2, moment_bits=4, **SHAMPOO),
    # The distributed_* configurations store their roots (the paper's 4-bit layout); the alias' default
    # layout (8-bit basis, roots formed at every step) is distributed_default_layout.
    "distributed_adam": lambda: s4.distributed_shampoo4(1e-3, weight_decay=1e-3, **SHAMPOO, **STORED_ROOT),
    "distributed_rmsprop_m8": lambda: s4.distributed_shampoo4(1e-3, grafting="rmsprop", momentum=0.9,
                                                              moment_bits=8, **SHAMPOO, **STORED_ROOT),
    "distributed_adagrad": lambda: s4.distributed_shampoo4(1e-3, grafting="adagrad", momentum=0.5,
                                                           nesterov=True, **SHAMPOO, **STORED_ROOT),
    "distributed_sgd": lambda: s4.distributed_shampoo4(1e-3, grafting="sgd", b1=0.0, **SHAMPOO, **STORED_ROOT),
    "distributed_frobenius_caspr": lambda: s4.distributed_shampoo4(
        1e-3, grafting="frobenius", combine="caspr", use_bias_correction=False, start_preconditioning_step=3,
        **SHAMPOO, **STORED_ROOT),
    "distributed_default_layout": lambda: s4.distributed_shampoo4(1e-3, weight_decay=1e-3, **SHAMPOO),
    "soap4": lambda: s4.soap4(3e-3, **SOAP),
    "soap4_m4": lambda: s4.soap4(3e-3, moment_bits=4, **SOAP),
}


def _params():
  rng = np.random.default_rng(0)
  shapes = {"w": (64, 72), "conv": (3, 5, 16), "b": (72,), "e": (20, 6)}
  return {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1) for k, s in shapes.items()}


def _gradients(params):
  """Deterministic gradients: a low-rank part that drifts plus noise, one step with a NaN."""
  rng = np.random.default_rng(1)
  out = []
  for step in range(1, STEPS + 1):
    grads = {}
    for k, p in params.items():
      shape = p.shape
      noise = rng.standard_normal(shape).astype(np.float32)
      flat = noise.reshape(shape[0], -1)
      u = np.cos(np.arange(flat.shape[0]) * 0.3 + 0.05 * step)[:, None]
      v = np.sin(np.arange(flat.shape[1]) * 0.2 - 0.03 * step)[None, :]
      g = (3.0 * u * v + 0.5 * flat).astype(np.float32).reshape(shape)
      if step == NONFINITE_STEP and k == "e":
        g[0, 0] = np.nan
      grads[k] = jnp.asarray(g)
    out.append(grads)
  return out


def _digest(tree) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def run(name: str) -> dict:
  """Digests of every update and of the final state of configuration ``name``."""
  tx = CONFIGS[name]()
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates = []
  for grads in _gradients(params):
    u, state = step(grads, state, params)
    params = optax.apply_updates(params, u)
    updates.append(_digest(u))
  return {"updates": updates, "state": _digest(state), "params": _digest(params)}


def _cpu_model() -> str:
  """The CPU's model name and ISA flags: XLA:CPU's float32 results differ between processors in the last bits."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
  model = fields.get("model name\t", "").strip()
  flags = hashlib.sha256(fields.get("flags\t\t", "").strip().encode()).hexdigest()[:16]
  return f"{model} / flags {flags}"


def _environment() -> dict:
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "machine": platform.machine(),
          "processor": platform.processor(), "cpu": _cpu_model()}


def _recorded() -> dict:
  return json.loads(FIXTURE.read_text())


@pytest.mark.slow  # about 6 CPU minutes: 50 configurations compiled and run
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reproduces_recorded_trajectory(name):
  recorded = _recorded()
  if recorded["environment"] != _environment():
    pytest.skip("bit equality holds only for the jax build and CPU the fixture was recorded on: recorded with "
                f"{recorded['environment']}, running {_environment()} (re-record: python {__file__})")
  assert name in recorded["runs"], f"{name} is not recorded: re-record with python {__file__}"
  want, got = recorded["runs"][name], run(name)
  first = next((i + 1 for i, (a, b) in enumerate(zip(want["updates"], got["updates"])) if a != b), None)
  assert first is None, f"{name}: the update of step {first} differs from the recording"
  assert got["state"] == want["state"], f"{name}: the final state differs from the recording"
  assert got["params"] == want["params"]


if __name__ == "__main__":
  runs = {}
  for config in sorted(CONFIGS):
    runs[config] = run(config)
    print(config, runs[config]["state"], flush=True)
  FIXTURE.write_text(json.dumps({"environment": _environment(), "steps": STEPS, "runs": runs}, indent=1) + "\n")
