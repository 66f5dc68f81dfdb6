"""Property tests: random shapes, dtypes, configurations and bad inputs.

Whatever the parameter shapes (0 to 4 dimensions, size-1 dimensions, primes,
dimensions above ``max_order``), dtypes (f32, bf16, f16) and options, the
transform either returns finite updates of the parameters' shapes and dtypes,
or refuses at construction / init with a ``ValueError`` / ``TypeError`` that
names the offending argument: never an XLA shape error from deep inside a step.

Bounded for the default run: few examples (each valid configuration compiles a
step), no deadline, derandomized so CI sees the same examples every time.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import optax_shampoo4 as s4

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DIMS = st.sampled_from([1, 2, 3, 5, 7, 11, 17])  # size 1, primes, above max_order
# At most 200 elements: a bounded number of blocks, so that a compile stays a few seconds.
SHAPES = st.lists(DIMS, min_size=0, max_size=4).map(tuple).filter(lambda s: math.prod(s) <= 200)
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])
CONFIGS = st.fixed_dictionaries({
    "max_order": st.sampled_from([8, 16]),
    "state_format": st.sampled_from(["eigen", "naive", "fp32"]),
    "bits": st.sampled_from([4, 8]),
    "quant_block": st.sampled_from([4, 8]),
    "min_quant_order": st.sampled_from([2, 5, 64]),
    "stats_every": st.sampled_from([1, 2]),
    "root_every": st.sampled_from([1, 2]),
    "grafting": st.sampled_from(["frobenius", "sgd", "adagrad", "rmsprop", "adam"]),
    "start_preconditioning_step": st.sampled_from([None, 2]),
    "filter_beta": st.sampled_from([None, 0.9]),
})


@settings(max_examples=3, **SETTINGS)
@given(shapes=st.lists(SHAPES, min_size=1, max_size=2), dtype=DTYPES, config=CONFIGS,
       seed=st.integers(0, 2**16))
# Always covered: 4 dimensions with a size-1 one and one above max_order, quantized, bf16.
@example(shapes=[(1, 17, 3, 2), (11,)], dtype=jnp.bfloat16, seed=0, config=dict(
    max_order=8, state_format="eigen", bits=4, quant_block=4, min_quant_order=5, stats_every=1,
    root_every=2, grafting="adam", start_preconditioning_step=2, filter_beta=0.9))
def test_random_trees_and_configs_give_finite_updates_of_the_right_dtype_and_shape(shapes, dtype, config, seed):
  tx = s4.scale_by_shampoo4(**config)
  rng = np.random.default_rng(seed)
  params = [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(2):  # step 2 refreshes statistics and roots in every configuration
    grads = [jnp.asarray(rng.standard_normal(p.shape), dtype) for p in params]
    updates, state = update(grads, state)
    for u, p in zip(updates, params):
      assert u.shape == p.shape and u.dtype == p.dtype
      assert bool(jnp.all(jnp.isfinite(u)))
  assert int(state.nonfinite_steps) == 0


# (argument, bad values): each must be refused, naming the argument.
BAD_ARGUMENTS = [
    ("max_order", [0, -3, 2.5, "8", True, np.float32(4.0)]),
    ("bits", [0, 5, 2.0, "4", True]),
    ("quant_block", [0, 1, 3.5, "64"]),
    ("min_quant_order", [0, -1, 1.5]),
    ("stats_every", [0, -2, 1.5, "10", True]),
    ("root_every", [0, -5, 2.5]),
    ("beta", [-0.1, 1.0, 1.5, math.nan, "x"]),
    ("epsilon", [-1e-6, math.inf, math.nan]),
    ("state_format", ["int4", 4, None]),
    ("mapping", ["log", 2]),
    ("bjorck_steps", [(1,), (1, -1), "14", (1.0, 4)]),
    ("root_method", ["svd", 1]),
    ("grafting", ["adamw", None, 1]),
    ("grafting_eps", [-1.0, math.nan]),
    ("grafting_beta2", [1.0, -0.5]),
    ("grafting_per_block", [1, "yes"]),
    ("start_preconditioning_step", [-1, 1.5, True]),
    ("filter_beta", [1.0, -0.1]),
    ("filter_bias_correction", [1, "no"]),
    ("mesh", ["data", 8]),
]
BAD_CASES = [(name, value) for name, values in BAD_ARGUMENTS for value in values]
SHAMPOO_ARGUMENTS_OF_EVERY_ALIAS = ("max_order", "bits", "quant_block", "min_quant_order", "stats_every",
                                    "root_every", "beta", "epsilon", "state_format", "mapping",
                                    "bjorck_steps", "root_method", "grafting", "start_preconditioning_step")


@settings(max_examples=60, **SETTINGS)
@given(case=st.sampled_from(BAD_CASES), config=CONFIGS)
def test_bad_arguments_are_refused_at_construction_naming_the_argument(case, config):
  name, value = case
  config = dict(config, **{name: value})
  if name == "grafting_beta2":
    config["grafting"] = "adam"
  with pytest.raises((ValueError, TypeError), match=name):
    s4.scale_by_shampoo4(**config)


@settings(max_examples=20, **SETTINGS)
@given(case=st.sampled_from([c for c in BAD_CASES if c[0] in SHAMPOO_ARGUMENTS_OF_EVERY_ALIAS]),
       alias=st.sampled_from(["adamw_shampoo4", "sgdm_shampoo4", "adagrad_shampoo4", "distributed_shampoo4"]))
def test_aliases_refuse_bad_shampoo_arguments_naming_them(case, alias):
  name, value = case
  with pytest.raises((ValueError, TypeError), match=name):
    getattr(s4, alias)(learning_rate=1e-3, **{name: value})


@settings(max_examples=12, **SETTINGS)
@given(dtype=st.sampled_from([jnp.int32, jnp.uint8, jnp.bool_, jnp.complex64]), shape=SHAPES)
def test_non_float_parameters_are_refused_at_init_naming_the_leaf(dtype, shape):
  tx = s4.scale_by_shampoo4(max_order=8)
  with pytest.raises(TypeError, match=r"\['bad'\]"):
    tx.init({"good": jnp.zeros((3, 3)), "bad": jnp.zeros(shape, dtype)})
