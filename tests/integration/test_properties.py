"""Property tests: random shapes, dtypes, configurations and bad inputs.

Whatever the parameter shapes (0 to 4 dimensions, size-1 dimensions, primes,
dimensions above ``max_order``), dtypes (f32, bf16, f16) and options, the
transform either returns finite updates of the parameters' shapes and dtypes,
or refuses at construction / init with a ``ValueError`` / ``TypeError`` that
names the offending argument: never an XLA shape error from deep inside a step.

Bounded for the default run: few examples (each valid configuration compiles a
step), no deadline, derandomized so CI sees the same examples every time.
"""

import contextlib
import functools
import inspect
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hlo_collectives import unordered_collectives
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import optax_shampoo4 as s4
from optax_shampoo4 import sharding as sharding_lib

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
@pytest.mark.slow
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
    ("beta", [-0.1, 1.5, math.nan, "x"]),  # beta = 1 is valid: a running sum (Meta's)
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


# ----------------------------------------------------------------------------
# Slow run: a real fuzz of every optimizer, not derandomized.
# ----------------------------------------------------------------------------
# Each run draws a new seed (printed, and in every failure message); S4_FUZZ_SEED=<seed> replays a run and
# S4_FUZZ_CASES=<n> sets the number of (tree, configuration) cases. Compiling a step dominates the cost, so the
# cases are drawn from a pool of configurations, each run on a few tree structures with fresh values per case:
# one compiled step per (configuration, structure) serves all of that pair's cases.
FUZZ_CASES = int(os.environ.get("S4_FUZZ_CASES", "400"))
FUZZ_CASES_PER_CONFIG = 8  # 4 cases on each of 2 tree structures
# No mesh, an Auto mesh, an explicit one, and parameters split FSDP-style over an explicit (4, 2) mesh.
FUZZ_MESHES = [None, "mesh", "explicit", "fsdp"]
SHAMPOO_CHOICES = dict(
    max_order=[4, 8, 16], beta=[0.0, 0.9, 0.95], epsilon=[0.0, 1e-6, 1e-3], stats_every=[1, 2],
    root_every=[1, 2, 3], state_format=["eigen", "naive", "fp32"], bits=[None, 3, 4, 8],
    mapping=["linear2", "dynamic_tree", "linear"], quant_block=[None, 2, 5, 8], min_quant_order=[2, 5, 64],
    bjorck_steps=[(1, 4), (0, 0), (2, 1)], root_method=[None, "eigen", "newton", "jorge"],
    refresh_method=["qr", "eigh", "adaptive"], qr_iterations=[None, 1, 2], refresh_tol=[0.0, 0.1, 1.0],
    grafting=["frobenius", "sgd", "adagrad", "rmsprop", "adam"], grafting_per_block=[None, True, False],
    start_preconditioning_step=[None, 2], filter_beta=[None, 0.9], combine=["shampoo", "caspr"],
    store_root=[True, False], moment_bits=[None, 8, 4], mesh=FUZZ_MESHES,
)
SOAP_CHOICES = dict(
    shampoo_beta=[None, 0.0, 0.9], precondition_every=[None, 1, 2], max_order=[4, 8, 16],
    max_precond_dim=[None, 5, 16], state_format=["eigen", "fp32"], bits=[None, 3, 4, 8],
    mapping=["linear2", "dynamic_tree", "linear"], quant_block=[None, 2, 5, 8], min_quant_order=[2, 5, 64],
    bjorck_steps=[(1, 1), (0, 0), (2, 1)], moment_bits=[None, 8, 4], mesh=FUZZ_MESHES,
    project_nu=[True, False], head_fraction=[None, 0.0, 0.25],
)
OPTIMIZERS = {  # name: (factory, choices, keyword arguments of the alias itself)
    "scale_by_shampoo4": (s4.scale_by_shampoo4, SHAMPOO_CHOICES, {}),
    "adamw_shampoo4": (s4.adamw_shampoo4, SHAMPOO_CHOICES, dict(learning_rate=[1e-3], weight_decay=[0.0, 0.1])),
    "sgdm_shampoo4": (s4.sgdm_shampoo4, SHAMPOO_CHOICES, dict(nesterov=[False, True], weight_decay=[0.0, 0.1])),
    "adagrad_shampoo4": (s4.adagrad_shampoo4, SHAMPOO_CHOICES, dict(initial_accumulator_value=[0.0, 0.1])),
    "distributed_shampoo4": (s4.distributed_shampoo4, SHAMPOO_CHOICES,
                             dict(momentum=[0.0, 0.9], nesterov=[False, True], use_bias_correction=[True, False])),
    "scale_by_soap4": (s4.scale_by_soap4, SOAP_CHOICES, {}),
    "soap4": (s4.soap4, SOAP_CHOICES, dict(weight_decay=[0.0, 0.01])),
}
FUZZ_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _fuzz_seed() -> int:
  seed = os.environ.get("S4_FUZZ_SEED")
  return int(seed) if seed else int.from_bytes(os.urandom(4), "little")


def _accepted(factory, kwargs):
  """The keyword arguments ``factory`` takes (an alias may not forward every option of its transform)."""
  parameters = inspect.signature(factory).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return kwargs
  return {k: v for k, v in kwargs.items() if k in parameters}


def _draw_config(rng, meshes):
  """An optimizer's name and keyword arguments; ``meshes``: ``{"mesh": an auto mesh, "explicit": an explicit one}``."""
  name = list(OPTIMIZERS)[rng.integers(len(OPTIMIZERS))]
  factory, choices, own = OPTIMIZERS[name]
  kwargs = {k: values[rng.integers(len(values))] for k, values in {**choices, **own}.items()
            if rng.random() < 0.5}  # about half the options keep their defaults
  kwargs = _accepted(factory, kwargs)
  return name, {k: (meshes[v] if k == "mesh" and v is not None else v) for k, v in kwargs.items()}


def _explicit_mesh(kwargs):
  """The transform's mesh if it has explicit axes (arrays then carry their layout as a type), else None."""
  mesh = kwargs.get("mesh")
  return mesh if mesh is not None and sharding_lib.is_explicit(mesh) else None


def _param_shardings(mesh, structure):
  """Each leaf's layout on an explicit mesh: on one with a "model" axis split over it FSDP-style along the first
  dimension it divides (else replicated), as users lay out parameters; replicated on the others."""
  def spec(shape):
    size = dict(mesh.shape).get("model")
    dims = [d for d, n in enumerate(shape) if size and n % size == 0]
    return PartitionSpec(*([None] * dims[0] + ["model"])) if dims else PartitionSpec()

  return {k: NamedSharding(mesh, spec(shape)) for k, (shape, _) in structure.items()}


def _draw_structure(rng):
  """1 to 3 leaves of rank 0 to 4 (size-1 dimensions, primes, above max_order), each its own float dtype."""
  dims = [1, 2, 3, 5, 7, 11, 17]
  leaves = {}
  while len(leaves) < rng.integers(1, 4):
    shape = tuple(int(d) for d in rng.choice(dims, size=rng.integers(0, 5)))
    if math.prod(shape) <= 200:
      leaves[f"p{len(leaves)}"] = (shape, FUZZ_DTYPES[rng.integers(len(FUZZ_DTYPES))])
  return leaves


def _draw_tree(rng, structure, zero_prob=0.0):
  """Random values of ``structure`` at a random scale; with ``zero_prob`` a leaf is all zeros."""
  scale = 10.0 ** rng.uniform(-3, 2)
  return {k: jnp.asarray((0.0 if rng.random() < zero_prob else scale) * rng.standard_normal(shape), dtype)
          for k, (shape, dtype) in structure.items()}


def _build(name, kwargs, params, param_shardings=None):
  """The transform and its initial state, or the ValueError/TypeError it raised at construction or init.

  On an explicit mesh the state is laid out by :func:`s4.state_sharding`, as a user of such meshes does.
  """
  try:
    tx = OPTIMIZERS[name][0](**kwargs)
    if _explicit_mesh(kwargs) is None:
      return tx, jax.jit(tx.init)(params), jax.jit(tx.update)
    shardings = s4.state_sharding(jax.eval_shape(tx.init, params), kwargs["mesh"], params_sharding=param_shardings)
    return tx, jax.jit(tx.init, out_shardings=shardings)(params), jax.jit(tx.update, out_shardings=(None, shardings))
  except (ValueError, TypeError) as e:
    return e, None, None


def _run_case(case_rng, tx, state, update, structure, place=lambda tree: tree):
  """Three steps from fresh values; ``place``: puts the drawn trees where the transform's mesh wants them."""
  params = place(_draw_tree(case_rng, structure))
  for _ in range(3):  # steps 2 and 3 refresh statistics and roots in every configuration
    grads = place(_draw_tree(case_rng, structure, zero_prob=0.1))
    updates, state = update(grads, state, params)
    for key, (shape, dtype) in structure.items():
      assert updates[key].shape == shape and updates[key].dtype == dtype, (key, updates[key])
      assert bool(jnp.all(jnp.isfinite(updates[key]))), key
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)


@pytest.mark.slow
def test_fuzz_every_optimizer_on_random_trees_and_configs():
  """Finite updates of the parameters' shapes and dtypes, or a ValueError/TypeError naming an argument."""
  seed = _fuzz_seed()
  print(f"fuzz: S4_FUZZ_SEED={seed} S4_FUZZ_CASES={FUZZ_CASES}")
  rng = np.random.default_rng(seed)
  meshes = {"mesh": jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
            "explicit": jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,)),
            "fsdp": jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)}
  ran = refused = 0
  for c in range(max(1, FUZZ_CASES // FUZZ_CASES_PER_CONFIG)):
    name, kwargs = _draw_config(rng, meshes)
    explicit = _explicit_mesh(kwargs)
    for s in range(2):
      structure = _draw_structure(rng)
      where = f"S4_FUZZ_SEED={seed}, config {c}, structure {s}: {name}({kwargs}) on {structure}"
      shardings = None if explicit is None else _param_shardings(explicit, structure)
      with jax.set_mesh(explicit) if explicit is not None else contextlib.nullcontext():
        ran_here, refused_here = _fuzz_pair(name, kwargs, structure, shardings, where, (seed, c, s), rng)
      ran, refused = ran + ran_here, refused + refused_here
  print(f"fuzz: {ran} cases ran, {refused} (configuration, structure) pairs refused at construction or init")
  assert ran >= FUZZ_CASES // 2, (ran, refused)  # most drawn configurations are valid


def _fuzz_pair(name, kwargs, structure, shardings, where, ids, rng):
  """One (configuration, structure) pair of the fuzz, its trees placed as ``shardings`` says (if not None):
  ``(cases run, pairs refused)``."""
  place = (lambda tree: tree) if shardings is None else functools.partial(jax.device_put, device=shardings)
  tx, state, update = _build(name, kwargs, place(_draw_tree(rng, structure)), shardings)
  if isinstance(tx, Exception):
    assert any(k in str(tx) for k in kwargs), f"{where}: the error names no argument: {tx!r}"
    return 0, 1
  if kwargs.get("mesh") is not None:  # every collective ordered with the refreshes (test_collective_order.py)
    params = place(_draw_tree(np.random.default_rng(0), structure))
    hlo = update.lower(params, state, params).compile().as_text()
    assert unordered_collectives(hlo) == [], f"{where}: collectives unordered with a refresh"
  for i in range(FUZZ_CASES_PER_CONFIG // 2):
    try:
      _run_case(np.random.default_rng([*ids, i]), tx, state, update, structure, place)
    except Exception as e:
      raise AssertionError(f"{where}, case {i}: {e!r}") from e
  return FUZZ_CASES_PER_CONFIG // 2, 0
