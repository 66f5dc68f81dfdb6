"""The optimizer-variant registry of the examples and benchmarks (``examples/variants.py``)."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

import optax_shampoo4 as s4

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import variants  # noqa: E402  (examples/variants.py)

# Small enough to trace fast, large enough that every factor is quantized (order >= 4) and refreshed every step.
SHAMPOO = {"stats_every": 1, "root_every": 1, "min_quant_order": 4}
SOAP = {"precondition_every": 1, "min_quant_order": 4}
TINY = {"w": jnp.linspace(-1.0, 1.0, 48).reshape(8, 6), "b": jnp.linspace(0.5, 1.0, 6)}
PEERS = ("distributed_shampoo", "distributed_shampoo int8", "psgdax kron")  # speed.py rows outside the registry


def _make(name):
  return variants.make(name, 1e-2, 1e-4, shampoo=SHAMPOO, soap=SOAP)


@pytest.mark.parametrize("name", variants.NAMES)
def test_every_name_builds_and_traces_init_and_update(name):
  tx = _make(name)
  state = jax.eval_shape(tx.init, TINY)
  updates, _ = jax.eval_shape(tx.update, TINY, state, TINY)
  assert jax.tree.map(lambda u, p: (u.shape, u.dtype) == (p.shape, p.dtype), updates, TINY) == {"w": True, "b": True}


@pytest.mark.parametrize("name", ["sgdm_m8", "sgdm+naive4_jorge", "soap32_m8"])
def test_one_name_per_family_updates_finitely(name):
  tx = _make(name)
  state, update = tx.init(TINY), jax.jit(tx.update)
  params = TINY
  for step in range(3):
    grads = jax.tree.map(lambda p, step=step: jnp.sin(3.0 * p + step), params)
    updates, state = update(grads, state, params)
    params = jax.tree.map(jnp.add, params, updates)
  assert all(bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


def test_names_are_unique_and_round_trip():
  assert len(set(variants.NAMES)) == len(variants.NAMES)
  for name in variants.NAMES:
    parsed = variants.parse(name)
    assert parsed.name == name == variants.canonical(name)
    assert variants.format_name(*parsed) == name
    assert variants.parse(variants.with_moment_bits(name, None)).moment_bits is None
    assert variants.with_moment_bits(variants.with_moment_bits(name, 4), parsed.moment_bits) == name
  # Every base x Shampoo variant, every SOAP variant, each with float32 and 8- / 4-bit moments.
  stems = len(variants.BASES) * (1 + len(variants.SHAMPOO_VARIANTS)) + len(variants.SOAP_VARIANTS)
  assert len(variants.NAMES) == stems * (1 + len(variants.MOMENT_SUFFIXES))


@pytest.mark.parametrize("name", ["", "adam", "adamw+", "+shampoo4", "adamw+soap4", "soap4+shampoo4",
                                  "sgdm+shampoo5", "adamw_m8_m8", "soap4_m4_m8", "adamw_m2", "adamw_m8+shampoo4",
                                  "sgdm+shampoo4 ", "ours eigen"])
def test_bad_names_raise_value_error_naming_the_name(name):
  with pytest.raises(ValueError, match="name="):
    variants.parse(name)
  with pytest.raises(ValueError, match="name="):
    variants.make(name, 1e-3, 0.0)


def test_options_the_name_fixes_cannot_be_overridden():
  with pytest.raises(ValueError, match="state_format"):
    variants.make("adamw+shampoo32", 1e-3, 0.0, shampoo={"state_format": "eigen"})
  with pytest.raises(ValueError, match="moment_bits"):
    variants.make("soap4", 1e-3, 0.0, soap={"moment_bits": 8})
  with pytest.raises(ValueError, match="moment_bits=2"):
    variants.format_name("adamw", None, 2)


@pytest.mark.parametrize("stem", ["adamw", "sgdm", "adamw+shampoo4", "sgdm+naive4_jorge", "soap4", "soap32"])
def test_moment_suffix_sets_the_moment_bits(stem):
  """8-bit moments take one byte per value, 4-bit half a byte; no suffix, no moment codes (nothing dropped)."""
  params = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}  # 4096 values: quantized moments
  codes = {suffix: s4.state_nbytes(jax.eval_shape(_make(stem + suffix).init, params))["moment_codes"]
           for suffix in ("", "_m8", "_m4")}
  moments = 2 if stem.startswith(("adamw", "soap")) else 1  # Adam's mu and nu, SGDM's one buffer
  assert codes == {"": 0, "_m8": moments * 4096, "_m4": moments * 2048}


def _program(tx):
  """``tx``'s state shapes and its update's jaxpr (the computation, traced, not run)."""
  state = jax.eval_shape(tx.init, TINY)
  return jax.tree.map(lambda x: (x.shape, x.dtype), state), str(jax.make_jaxpr(tx.update)(TINY, state, TINY))


@pytest.mark.parametrize("name, direct", [
    ("adamw+shampoo4_qr_m8", lambda: s4.adamw_shampoo4(1e-2, weight_decay=1e-4, refresh_method="qr",
                                                        moment_bits=8, **SHAMPOO)),
    ("sgdm+shampoo32", lambda: s4.sgdm_shampoo4(1e-2, weight_decay=1e-4, state_format="fp32", **SHAMPOO)),
    ("soap4_nohead", lambda: s4.soap4(1e-2, weight_decay=1e-4, head_fraction=0.0, **SOAP)),
    ("soap8_m4", lambda: s4.soap4(1e-2, weight_decay=1e-4, bits=8, moment_bits=4, **SOAP)),
])
def test_make_builds_the_same_program_as_the_direct_call(name, direct):
  assert _program(_make(name)) == _program(direct())


def test_program_comparison_sees_one_option():
  assert _program(_make("adamw+shampoo4_qr_m8")) != _program(_make("adamw+shampoo4_m8"))


def test_result_files_use_registry_names():
  """The committed results still read: quality runs by registry name, speed and memory rows by registry or legacy
  label."""
  results = ROOT / "benchmarks" / "results"
  for path in results.glob("quality*.json"):
    for example, by_seed in json.loads(path.read_text())["runs"].items():
      for name in {name for runs in by_seed.values() for name in runs}:
        assert variants.canonical(name) == name, (path.name, example, name)
  for path in results.glob("speed*.json"):
    for row in json.loads(path.read_text())["rows"]:
      if row not in PEERS:
        variants.canonical(row)
  for model in json.loads((results / "memory.json").read_text())["models"].values():
    for row in [*model["states"], *model["moment_bits_vs_adamw"], *model.get("soap", {}).get("states", {})]:
      variants.canonical(row)
  assert set(variants.LEGACY_NAMES.values()) <= set(variants.NAMES)
