"""Tests for state_nbytes: exact byte counts and the paper's ~7x compression."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_shampoo4 as s4
from benchmarks.model_shapes import gpt2_124m


def test_gpt2_eigen_state_is_over_6_5x_smaller_than_fp32():
  params = gpt2_124m()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  assert 124e6 < n_params < 125e6
  sizes = {fmt: s4.state_nbytes(jax.eval_shape(s4.scale_by_shampoo4(state_format=fmt).init, params))
           for fmt in ("eigen", "fp32")}
  ratio = sizes["fp32"]["preconditioner"] / sizes["eigen"]["preconditioner"]
  assert ratio >= 6.5, ratio
  assert ratio < 32 / 4.5  # cannot beat the codes + scales bound of 4.5 bits per element


def test_exact_bytes_of_one_eigen_matrix():
  n = 512
  state = jax.eval_shape(s4.scale_by_shampoo4().init, {"w": jax.ShapeDtypeStruct((n, n), jnp.float32)})
  parts = s4.state_nbytes(state)
  factors, matrices = 2, 2  # L and R; eigenvectors and root off-diagonal for each
  assert parts["quantized_codes"] == factors * matrices * n * n // 2
  assert parts["quantized_scales"] == factors * matrices * n * (n // 64) * 4
  assert parts["eigenvalues"] == factors * n * 4
  assert parts["diagonals"] == factors * n * 4
  assert parts["dense_factors"] == 0
  assert parts["other"] == 4 * 4  # count and three failure counters
  assert parts["total"] == sum(v for k, v in parts.items() if k not in ("total", "preconditioner"))


def test_odd_order_codes_need_half_a_byte_per_element_rounded_up_per_row():
  n = 65
  state = s4.scale_by_shampoo4().init({"w": jnp.zeros((n, n))})
  assert s4.state_nbytes(state)["quantized_codes"] == 2 * 2 * n * 33


@pytest.mark.parametrize("state_format", [pytest.param("eigen", marks=pytest.mark.slow), "naive", "fp32"])
def test_abstract_and_concrete_states_measure_the_same(state_format):
  opt = s4.adamw_shampoo4(1e-3, state_format=state_format)
  params = {"w": jnp.zeros((130, 70)), "b": jnp.zeros((70,)), "tiny": jnp.zeros((3, 5))}
  concrete = s4.state_nbytes(opt.init(params))
  abstract = s4.state_nbytes(jax.eval_shape(opt.init, params))
  assert concrete == abstract
  n_params = 130 * 70 + 70 + 15
  assert concrete["first_order"] == 2 * 4 * n_params  # Adam's mu and nu
  dense = 4 * 2 * (3 * 3 + 5 * 5)  # the small factors of "tiny" stay fp32 (stats/eigvecs + root)
  if state_format == "fp32":
    dense += 4 * 2 * (130 * 130 + 70 * 70)
  assert concrete["dense_factors"] == dense


def test_first_order_only_state():
  parts = s4.state_nbytes(optax.adam(1e-3).init({"w": jnp.zeros((10, 10))}))
  assert parts["first_order"] == 800 and parts["preconditioner"] == 0
