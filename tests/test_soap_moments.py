"""SOAP with quantized Adam moments (``moment_bits=8 | 4``): codes in the state, training tracks float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import moment_storage


def _problem():
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (512, 96))
  target = jnp.tanh(x @ jax.random.normal(jax.random.fold_in(key, 1), (96, 64)))

  def loss(params):
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - target) ** 2)

  params = {"w": 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (96, 128)), "v": jnp.zeros((128, 64)),
            "b": jnp.zeros((64,))}
  return loss, params


def _train(moment_bits, steps=300):
  loss, params = _problem()
  opt = s4.soap4(3e-3, moment_bits=moment_bits, min_quant_order=32)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return np.mean(losses[-30:]), state


@pytest.fixture(scope="module")
def runs():
  return {bits: _train(bits) for bits in (None, 8, 4)}


@pytest.mark.slow  # three 300-step trainings (the module fixture): ~25 s on 2 cores
def test_state_holds_codes_for_large_moments_and_float32_for_small(runs):
  _, state = runs[8]
  soap_state = state[0]
  assert soap_state.mu["w"].dtype == jnp.uint8 and soap_state.nu["v"].dtype == jnp.uint8
  assert soap_state.mu["b"].dtype == jnp.float32  # below MIN_QUANTIZED_SIZE
  _, state4 = runs[4]
  assert state4[0].mu["w"].shape == (96, 64)  # two 4-bit codes a byte
  parts = s4.state_nbytes(state4)
  assert parts["moment_codes"] > 0 and parts["moment_scales"] > 0


@pytest.mark.slow  # three 300-step trainings (the module fixture): ~25 s on 2 cores
def test_8bit_moments_track_float32_moments(runs):
  reference, _ = runs[None]
  quantized, _ = runs[8]
  assert quantized <= 1.05 * reference, (quantized, reference)
  four, _ = runs[4]
  assert np.isfinite(four) and four < 0.5 * _problem()[0](_problem()[1])  # 4-bit still trains


@pytest.mark.slow  # three 300-step trainings (the module fixture): ~25 s on 2 cores
def test_stored_moments_decode_to_the_float32_moment_within_the_code_error(runs):
  """The decoded second moment is non-negative and each first-moment block within its scale's step."""
  _, state = runs[8]
  soap_state = state[0]
  shape = soap_state.mu["w"].shape
  mu = moment_storage.load_moment(moment_storage.join_stored(soap_state.mu["w"], soap_state.mu_scales["w"],
                                                             shape, 8, "first"))
  nu = moment_storage.load_moment(moment_storage.join_stored(soap_state.nu["w"], soap_state.nu_scales["w"],
                                                             shape, 8, "second"))
  assert bool(jnp.all(nu >= 0)) and bool(jnp.any(nu > 0))
  assert bool(jnp.all(jnp.isfinite(mu))) and float(jnp.abs(mu).max()) > 0


@pytest.mark.slow  # two compilations, ~16 s on 2 cores
def test_nonfinite_gradient_keeps_quantized_moments():
  _, state = _train(8, steps=12)  # past the first basis refresh: moments stored as codes
  loss, params = _problem()
  opt = s4.soap4(3e-3, moment_bits=8, min_quant_order=32, weight_decay=0.0)  # no decay: a zero update
  grads = jax.tree.map(lambda p: jnp.full(p.shape, jnp.nan), params)
  updates, new_state = jax.jit(opt.update)(grads, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  for a, b in zip(jax.tree.leaves(state[0]._replace(count=0, nonfinite_steps=0, skipped_stats=0)),
                  jax.tree.leaves(new_state[0]._replace(count=0, nonfinite_steps=0, skipped_stats=0))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
