"""Long-run stability (slow): thousands of refreshes on an ill-conditioned problem.

Run with ``pytest -m slow tests/integration/test_stability.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_shampoo4 as s4

STEPS = 20_000
STATS_EVERY, ROOT_EVERY = 10, 20  # 2,000 statistics and 1,000 root refreshes per factor
NOISE = 0.01


def _problem(n=1024, d_in=64, d_out=16, input_cond=1e3, seed=0):
  """Least squares on rotated inputs whose covariance has condition number input_cond**2 = 1e6."""
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
  x = (rng.standard_normal((n, d_in)) * np.logspace(0, -np.log10(input_cond), d_in)) @ rotation.T
  y = x @ (rotation @ rng.standard_normal((d_in, d_out))) + NOISE * rng.standard_normal((n, d_out))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _loss(params, x, y):
  return 0.5 * jnp.mean(jnp.sum((x @ params["w"] + params["b"] - y) ** 2, axis=-1))


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
                            if jnp.issubdtype(leaf.dtype, jnp.floating)]))


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1e-6, 1e-4])
@pytest.mark.parametrize("state_format", ["eigen", "naive", "fp32"])
def test_thousands_of_refreshes_stay_finite_and_converge(state_format, epsilon):
  x, y = _problem()
  # w (64, 16): a quantized order-64 factor (eigen/naive) and a float32 order-16 one.
  params = {"w": jnp.zeros((64, 16)), "b": jnp.zeros((16,))}
  opt = s4.adamw_shampoo4(1e-2, weight_decay=0.0, epsilon=epsilon, stats_every=STATS_EVERY,
                          root_every=ROOT_EVERY, state_format=state_format)

  def step(carry, key):
    params, state = carry
    batch = jax.random.randint(key, (128,), 0, x.shape[0])
    grads = jax.grad(_loss)(params, x[batch], y[batch])
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    loss = _loss(params, x, y)
    return (params, state), (loss, _all_finite((loss, params, state)))

  @jax.jit
  def train(params, state):
    return jax.lax.scan(step, (params, state), jax.random.split(jax.random.key(0), STEPS))

  initial = float(_loss(params, x, y))
  (params, state), (losses, finite) = train(params, opt.init(params))
  losses, finite = np.asarray(losses), np.asarray(finite)

  assert finite.all(), f"first non-finite value at step {int(np.argmin(finite)) + 1}"
  shampoo = state[0]
  assert int(shampoo.count) == STEPS
  assert int(shampoo.nonfinite_steps) == 0 and int(shampoo.skipped_stats) == 0
  assert int(shampoo.failed_refreshes) == 0
  if state_format != "fp32":
    assert isinstance(shampoo.factors["order64_q"].eigvecs if state_format == "eigen"
                      else shampoo.factors["order64_q"].stats, (s4.QuantizedArray, s4.OffDiagQuantized))
  # Converges to near the noise floor (0.5 * d_out * NOISE**2 = 8e-4) ...
  final = losses[-100:].mean()
  assert final < 1e-3 * initial, (final, initial)
  assert final < 10 * 0.5 * 16 * NOISE**2, final
  # ... and stays there: no late spikes over the last 1,000 steps.
  late = losses[-1000:]
  assert late.max() < 5 * late.min(), (late.max(), late.min())
