"""The engine refreshes one bucket after another: same results, the scratch of the largest bucket, not of all.

XLA:CPU starts independent per-bucket programs together, so without a data dependence between them a
refresh's temporaries are the sum over buckets; :func:`engine.after_previous` adds an exact one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_shampoo4 import engine, soap
from optax_shampoo4 import factors as fct

# Four weights of 160×224 and two of 96×96: buckets of orders 96, 160 and 224 (4-bit eigenvectors).
SHAPES = [(160, 224)] * 4 + [(96, 96)] * 2


def _setup(config, with_root):
  factor_engine = engine.FactorEngine(config, 1024, 64)
  plan = factor_engine.plan([jax.ShapeDtypeStruct(s, jnp.float32) for s in SHAPES])
  buckets = factor_engine.init_buckets(plan, 1e-6, with_root=with_root)
  rng = np.random.default_rng(0)
  matrices = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in SHAPES]
  return factor_engine, plan, buckets, matrices


def _refresh(factor_engine, plan):
  return jax.jit(lambda b, m: factor_engine.refresh_stats(b, plan, m, jnp.float32(0.9)))


def _scratch_bytes(fn, *args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


CONFIGS = {
    "soap4": soap.soap_factor_config(4, "linear2", 64, (1, 1), head_fraction=1 / 16),
    "shampoo eigen": fct.FactorConfig(),
    "shampoo naive": fct.FactorConfig("naive"),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "shampoo naive" else n
                                  for n in CONFIGS])  # soap4 ~25 s, shampoo eigen ~9 s on 2 cores
def test_sequenced_refresh_is_exact_and_needs_less_scratch(monkeypatch, name):
  config = CONFIGS[name]
  with_root = name != "soap4"
  factor_engine, plan, buckets, matrices = _setup(config, with_root)
  assert len(buckets) == 3
  roots = jax.jit(lambda b: factor_engine.refresh_roots(b, jnp.float32(1e-4), plan))
  sequenced = _refresh(factor_engine, plan)
  new, failures, _ = sequenced(buckets, matrices)
  again, _, _ = sequenced(new, matrices)  # from non-identity bases too
  if with_root:
    again, _ = roots(again)
  sequenced_bytes = _scratch_bytes(sequenced, new, matrices)

  monkeypatch.setattr(engine, "after_previous", lambda inputs, done: inputs)
  roots = jax.jit(lambda b: factor_engine.refresh_roots(b, jnp.float32(1e-4), plan))
  together = _refresh(factor_engine, plan)
  new_together, failures_together, _ = together(buckets, matrices)
  again_together, _, _ = together(new_together, matrices)
  if with_root:
    again_together, _ = roots(again_together)
  together_bytes = _scratch_bytes(together, new, matrices)

  assert int(failures) == int(failures_together) == 0
  # The dependence goes through the codes (integer adds before table lookups), so XLA fuses the float
  # arithmetic as without it: the same bits.
  for a, b in zip(jax.tree.leaves((new, again)), jax.tree.leaves((new_together, again_together))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The 224-order bucket holds most of the bytes: with the dependence the scratch is well under the sum.
  assert sequenced_bytes < 0.8 * together_bytes, (sequenced_bytes, together_bytes)


def test_after_previous_passes_values_through_even_after_non_finite_results():
  done = {"a": fct.EigenFactors(jnp.eye(3), jnp.array([[jnp.inf, jnp.nan, -1.0]]), None)}
  floats = (jnp.array([0.0, -0.0, 2.5, jnp.inf, -jnp.inf]), jnp.array([[1e-30, -7.0]]))
  out = jax.jit(engine.after_previous)(floats, done)  # float leaves only: they carry the dependence
  for a, b in zip(out, floats):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.signbit(np.asarray(out[0])[1])
  mixed = (jnp.array([-0.0, 3.0]), jnp.arange(250, 256, dtype=jnp.uint8))
  out = jax.jit(engine.after_previous)(mixed, done)  # codes present: they carry it
  assert out[1].dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(out[1]), np.arange(250, 256))
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(mixed[0]))
  assert engine.after_previous(mixed, {}) is mixed
