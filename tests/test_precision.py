"""The ``precision=`` option of the every-step products (``linalg.step_matmul``).

* the lowered program: every per-step product at the chosen setting (bf16 operands for "default", three bf16
  products for "high"), every refresh product (statistics, QR, eigh, Björck, roots) float32 at HIGHEST;
* the products themselves against float64 numpy references, with bounds from float32 / bfloat16 error analysis;
* validation, and the transforms' outputs at each setting.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import linalg

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
DOT = re.compile(r"stablehlo\.dot_general .*?(precision = \[(\w+), (\w+)\])?\s*:\s*"
                 r"\(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>")


def _dots(text: str) -> list[dict]:
  """Every dot of a StableHLO module: its precision config and operand / result element types."""
  dots = []
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    match = DOT.search(line)
    assert match, line
    precision, lhs, rhs, out = match.group(2), match.group(4), match.group(5), match.group(6)
    dots.append({"precision": precision or "DEFAULT", "lhs": lhs.split("x")[-1], "rhs": rhs.split("x")[-1],
                 "out": out.split("x")[-1]})
  return dots


def _lowered_dots(tx, params) -> list[dict]:
  state = tx.init(params)
  return _dots(jax.jit(tx.update).lower(params, state, params).as_text())


PARAMS = {"w": jnp.zeros((8, 6)), "b": jnp.zeros(6)}  # one 8x6 block (factors of order 8 and 6), a passthrough bias
SMALL = dict(min_quant_order=4, quant_block=4)
# transform factory -> the number of per-step products it forms for PARAMS (left and right factor, one block)
CASES = {
    "shampoo": (lambda p: s4.scale_by_shampoo4(precision=p, **SMALL), 2),  # L̂ G, (L̂ G) R̂
    "shampoo_store_root_false": (lambda p: s4.scale_by_shampoo4(store_root=False, precision=p, **SMALL),
                                 2 + 2),  # and V D Vᵀ per factor bucket (orders 8 and 6)
    "caspr": (lambda p: s4.scale_by_shampoo4(combine="caspr", precision=p, **SMALL), 4),  # L̂G, GR̂, L̂J, JR̂
    "soap": (lambda p: s4.scale_by_soap4(precision=p, **SMALL), 2 + 2 + 2 + 2),  # rotate, back, m and v carried
}


@pytest.mark.parametrize("case", list(CASES))
def test_lowered_program_has_step_products_at_the_chosen_precision(case):
  factory, step_products = CASES[case]
  by_precision = {p: _lowered_dots(factory(p), PARAMS) for p in linalg.STEP_PRECISIONS}
  for precision, dots in by_precision.items():
    bf16 = [d for d in dots if d["lhs"] == "bf16" or d["rhs"] == "bf16"]
    f32 = [d for d in dots if d not in bf16]
    # Every float32 product (the refresh maths always; the step products at "highest") runs at HIGHEST.
    assert all(d["lhs"] == d["rhs"] == d["out"] == "f32" and d["precision"] == "HIGHEST" for d in f32), f32
    # bf16 products: both operands bf16, accumulated into float32.
    assert all(d["lhs"] == d["rhs"] == "bf16" and d["out"] == "f32" for d in bf16), bf16
    passes = {"highest": 0, "high": 3, "default": 1}[precision]
    assert len(bf16) == passes * step_products, (precision, len(bf16))
  # The refresh products are the same at every setting: "highest" has exactly the step products more in f32.
  refresh = len(by_precision["default"]) - step_products
  assert refresh > 0
  assert len(by_precision["highest"]) == refresh + step_products
  assert len(by_precision["high"]) == refresh + 3 * step_products


def test_aliases_forward_precision_into_the_program():
  dots = _lowered_dots(s4.adamw_shampoo4(1e-3, precision="default", **SMALL), PARAMS)
  assert sum(d["lhs"] == "bf16" for d in dots) == 2
  dots = _lowered_dots(s4.soap4(1e-3, precision="default", **SMALL), PARAMS)
  assert sum(d["lhs"] == "bf16" for d in dots) == 8


def _operands(seed, m=24, k=200, n=16):
  rng = np.random.default_rng(seed)
  # Entries over several binades, so that rounding to bf16 matters in every product.
  a = rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, (m, k)))
  b = rng.standard_normal((k, n)) * np.exp(rng.uniform(-3, 3, (k, n)))
  return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_default_is_the_product_of_bf16_operands_accumulated_in_f32(seed):
  a, b = _operands(seed)
  got = np.asarray(linalg.step_matmul(jnp.asarray(a), jnp.asarray(b), "default"), np.float64)
  a16 = np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  b16 = np.asarray(jnp.asarray(b).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  assert not np.array_equal(a16, a)  # the operands were really rounded
  exact = a16 @ b16
  k = a.shape[1]
  # Products of bf16 numbers are exact in float32; summing k of them in float32: |err| <= k eps32 (|a||b|).
  bound = k * EPS32 * (np.abs(a16) @ np.abs(b16))
  assert np.all(np.abs(got - exact) <= bound)
  # ... and it differs from the float32 product by the operands' rounding, |err| <= 2 u_bf16 (|a||b|) + the above.
  full = a.astype(np.float64) @ b.astype(np.float64)
  assert np.all(np.abs(got - full) <= (2.01 * U_BF16 + k * EPS32) * (np.abs(a) @ np.abs(b).astype(np.float64)))


@pytest.mark.parametrize("seed", [0, 1])
def test_high_is_bf16x3(seed):
  a, b = _operands(seed)
  got = np.asarray(linalg.step_matmul(jnp.asarray(a), jnp.asarray(b), "high"), np.float64)
  exact = a.astype(np.float64) @ b.astype(np.float64)
  k = a.shape[1]
  # a = hi + lo + da with |da| <= u^2 |a| (u = 2^-8, the rounding of lo); the dropped lo·lo' <= u^2 |a||b|:
  # |err| <= 3 u^2 (|a||b|) + f32 accumulation of three sums, (k + 2) eps32 (|a||b|).
  scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
  assert np.all(np.abs(got - exact) <= (3.01 * U_BF16**2 + (k + 2) * EPS32) * scale)
  # Relative to the float32 product, in norm: within 1e-5 (3 u^2 = 4.6e-5 is the elementwise worst case).
  f32 = np.asarray(linalg.step_matmul(jnp.asarray(a), jnp.asarray(b), "highest"), np.float64)
  assert np.linalg.norm(got - f32) <= 1e-5 * np.linalg.norm(f32)


def test_split_bf16_parts():
  x = jnp.asarray(np.random.default_rng(0).standard_normal(1000), jnp.float32)
  hi, lo = linalg.split_bf16(x)
  assert hi.dtype == lo.dtype == jnp.bfloat16
  rest = np.abs(np.asarray(x, np.float64) - np.asarray(hi, np.float64) - np.asarray(lo, np.float64))
  assert np.all(rest <= U_BF16**2 * np.abs(np.asarray(x, np.float64)))


def test_highest_is_linalg_matmul():
  a, b = _operands(3, 8, 8, 8)
  np.testing.assert_array_equal(linalg.step_matmul(a, b, "highest"), linalg.matmul(a, b))


@pytest.mark.parametrize("factory", [s4.scale_by_shampoo4, s4.scale_by_soap4, s4.adamw_shampoo4, s4.sgdm_shampoo4,
                                     s4.adagrad_shampoo4, s4.distributed_shampoo4, s4.soap4])
@pytest.mark.parametrize("bad", ["HIGHEST", "bf16", None, 3])
def test_bad_precision_raises(factory, bad):
  args = () if factory.__name__.startswith("scale_by") else (1e-3,)
  if bad is None:  # None means the default
    factory(*args, precision=None)
    return
  with pytest.raises(ValueError, match="precision"):
    factory(*args, precision=bad)


def _updates(tx, steps=6):
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((12, 10))}
  state, update = tx.init(params), jax.jit(tx.update)
  for _ in range(steps):
    grads = {"w": jnp.asarray(rng.standard_normal((12, 10)), jnp.float32)}
    out, state = update(grads, state, params)
  return np.asarray(out["w"], np.float64)


@pytest.mark.parametrize("make", [
    lambda p: s4.scale_by_shampoo4(stats_every=2, root_every=2, precision=p, **SMALL),
    pytest.param(lambda p: s4.scale_by_shampoo4(stats_every=2, store_root=False, precision=p, **SMALL),
                 marks=pytest.mark.slow),  # ~7 s on 2 cores
    pytest.param(lambda p: s4.scale_by_soap4(precondition_every=2, precision=p, **SMALL), id="soap",
                 marks=pytest.mark.slow),  # ~18 s on 2 cores
], ids=["shampoo", "store_root_false", "soap"])
def test_updates_at_each_precision_stay_close(make):
  """The step products' rounding changes the update by about its operands' relative precision."""
  reference = _updates(make("highest"))
  np.testing.assert_array_equal(reference, _updates(make(None)))  # the default is "highest"
  for precision, tolerance in (("high", 1e-3), ("default", 0.1)):
    got = _updates(make(precision))
    assert np.all(np.isfinite(got))
    error = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    # bf16 operands: relative 2^-8 per rounding, a few roundings per step and fed back through the
    # state over six steps; bf16x3: about 2^-16. Tolerances are >= 10x the errors observed.
    assert error < tolerance, (precision, error)
    if precision == "default":
      assert error > 0  # the setting really changed the products
