"""optax's own contrib test matrix, run on every alias of optax_shampoo4.

optax checks each contributed optimizer with the tests of
``optax/contrib/_common_test.py``: extra arguments to ``update``, no recompile
on the second call, ``optax.tree.map_params``, convergence on a parabola,
Rosenbrock, a matrix parabola and a mixed 1-D/2-D target within 3e-2 after
30k scanned steps, ``inject_hyperparams`` without ``static_args``, dtype
preservation, ``MultiSteps``, state stability under ``lax.cond`` in f16, bf16,
f32 and f64 (x64), and learning-rate schedules.

That module is loaded here from the installed optax at test time (it is not
copied), its test functions are run unchanged, and only its optimizer lists
are swapped for ours: every public alias of ``optax_shampoo4`` (a factory
taking a ``learning_rate``), discovered from the package, so that aliases
added later are covered without editing this file. The parameter grid of each
test (targets, dtypes, wrapping) is the one optax's module declares.

The default run covers every test and grid point with one alias each (taken in
turn, so every alias runs); ``-m slow`` runs the full product.
"""

import importlib.util
import inspect
import os

import optax
import optax.contrib
import pytest

import optax_shampoo4 as s4

# Refresh often enough that the small convergence problems see many preconditioner
# updates; every alias gets the subset its signature accepts.
SCHEDULE = dict(stats_every=5, root_every=10, precondition_every=10)
# Per alias: the hyperparameters we choose (optax's own list picks a learning rate
# per optimizer in the same way). Aliases not listed get DEFAULT_KWARGS.
ALIAS_KWARGS = {
    "adamw_shampoo4": dict(learning_rate=1e-2, weight_decay=0.0),
    "sgdm_shampoo4": dict(learning_rate=1e-3, momentum=0.9),
    "adagrad_shampoo4": dict(learning_rate=1.0),
    "distributed_shampoo4": dict(learning_rate=1e-2),
    "soap4": dict(learning_rate=1e-2, weight_decay=0.0),
}
DEFAULT_KWARGS = dict(learning_rate=1e-2)
OPTIMIZER_KEYS = ("opt_name", "opt_kwargs", "wrapper_name", "wrapper_kwargs")


def _aliases() -> dict:
  found = {}
  for name in s4.__all__:
    obj = getattr(s4, name)
    if inspect.isfunction(obj) and "learning_rate" in inspect.signature(obj).parameters:
      found[name] = obj
  return found


ALIASES = _aliases()


def _alias_kwargs(name: str) -> dict:
  parameters = inspect.signature(ALIASES[name]).parameters
  kwargs = {k: v for k, v in SCHEDULE.items() if k in parameters}
  kwargs.update(ALIAS_KWARGS.get(name, DEFAULT_KWARGS))
  return kwargs


def _load_common_test_module():
  path = os.path.join(os.path.dirname(optax.contrib.__file__), "_common_test.py")
  spec = importlib.util.spec_from_file_location("optax_contrib_common_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


COMMON = _load_common_test_module()


def _our_factory(opt_name):
  if opt_name in ALIASES:
    return ALIASES[opt_name]
  raise ValueError(f"Unknown optimizer: {opt_name}")


def _test_grid():
  """``{raw test function name: (function, [extra parameter dicts])}`` from optax's parameterization.

  absl's ``parameterized`` expands each test into numbered methods that wrap
  the original function (``__wrapped__``) and close over one parameter dict;
  the non-optimizer entries of those dicts (target, dtype, wrap) form the grid.
  """
  grid = {}
  for attribute in dir(COMMON.ContribTest):
    method = getattr(COMMON.ContribTest, attribute)
    raw = getattr(method, "__wrapped__", None)
    if not attribute.startswith("test") or raw is None:
      continue
    function, combos = grid.setdefault(raw.__name__, (raw, []))
    for cell in method.__closure__ or ():
      if isinstance(cell.cell_contents, dict):
        extra = {k: v for k, v in cell.cell_contents.items() if k not in OPTIMIZER_KEYS}
        if extra not in combos:
          combos.append(extra)
  return grid


GRID = _test_grid()


def _cases():
  """Every (test, grid point, alias). The default run takes one alias per (test, grid point), in
  turn, so that every alias and every test runs; the full product is marked slow."""
  cases, turn = [], 0
  names = sorted(ALIASES)
  for test_name, (_, combos) in sorted(GRID.items()):
    for extra in combos:
      label = "-".join(getattr(v, "__name__", str(v)) for v in extra.values())
      default_alias = names[turn % len(names)]
      turn += 1
      for alias in names:
        marks = [] if alias == default_alias else [pytest.mark.slow]
        cases.append(pytest.param(test_name, alias, extra, marks=marks,
                                  id=f"{test_name}-{alias}" + (f"-{label}" if label else "")))
  return cases


def test_the_matrix_is_optax_s():
  """The loaded module really is optax's matrix: all its tests, our aliases under test."""
  expected = {"test_optimizers_accept_extra_args", "test_optimizers",
              "test_optimizers_can_be_wrapped_in_inject_hyperparams", "test_preserve_dtype",
              "test_gradient_accumulation", "test_state_shape_dtype_shard_stability",
              "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such"}
  assert expected <= set(GRID)
  assert {"adamw_shampoo4", "sgdm_shampoo4", "adagrad_shampoo4", "distributed_shampoo4"} <= set(ALIASES)
  targets = {extra["target"].__name__ for extra in GRID["test_optimizers"][1]}
  assert {"_setup_parabola", "_setup_rosenbrock", "_setup_matrix_parabola"} <= targets


@pytest.mark.parametrize("test_name, alias, extra", _cases())
def test_optax_contrib_common(test_name, alias, extra, monkeypatch):
  monkeypatch.setattr(COMMON, "_get_opt_factory", _our_factory)
  function = GRID[test_name][0]
  parameters = inspect.signature(function).parameters
  kwargs = dict(opt_name=alias, opt_kwargs=_alias_kwargs(alias), wrapper_name=None, wrapper_kwargs=None)
  kwargs = {k: v for k, v in kwargs.items() if k in parameters}
  # Outside a unittest runner, subTest blocks re-raise their failures and skipTest raises.
  test_case = COMMON.ContribTest(methodName="run")
  function(test_case, **kwargs, **extra)
