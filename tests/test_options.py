"""Tests of ``optax_shampoo4.options``: defaults resolved once, every error names its argument and value."""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import optax_shampoo4 as s4
from optax_shampoo4 import options, validation

SHAMPOO_ERRORS = [
    ("max_order", 0), ("max_order", 2.0), ("beta", 1.01), ("beta", -0.1), ("epsilon_mode", "abs"),
    ("stats_bias_correction", 1), ("precondition_1d", "yes"), ("epsilon", -1e-6),
    ("epsilon", float("nan")), ("stats_every", 0), ("root_every", 2.5), ("state_format", "int8"),
    ("bits", 2), ("bits", True), ("mapping", "log"), ("quant_block", 1), ("quant_block", 63),
    ("min_quant_order", 0), ("bjorck_steps", (1,)), ("bjorck_steps", (-1, 4)), ("root_method", "cholesky"),
    ("refresh_method", "lanczos"), ("qr_iterations", 0), ("refresh_tol", 1.5), ("grafting", "lion"),
    ("grafting_eps", -1.0), ("grafting_beta2", 1.0), ("grafting_per_block", "yes"),
    ("start_preconditioning_step", -1), ("filter_beta", 1.0), ("filter_bias_correction", 1),
    ("combine", "sum"), ("store_root", "no"), ("mesh", "cpu"),
]
SOAP_ERRORS = [
    ("b1", 1.0), ("b2", -0.5), ("eps", -1.0), ("shampoo_beta", 1.0), ("precondition_every", 0),
    ("max_order", 0), ("max_precond_dim", 0), ("state_format", "naive"), ("bits", 5), ("mapping", "log"),
    ("quant_block", 7), ("min_quant_order", 0), ("bjorck_steps", (1, 1, 1)), ("moment_bits", 16),
    ("project_nu", "yes"), ("statistic", "every"), ("head_fraction", 1.0), ("head_fraction", "1/16"), ("mesh", "cpu"),
]


def _names_argument_and_value(error: Exception, name: str, value) -> None:
  message = str(error)
  assert name in message, message
  assert repr(value) in message or str(value) in message, message


@pytest.mark.parametrize("name, value", SHAMPOO_ERRORS)
def test_shampoo_errors_name_argument_and_value(name, value):
  with pytest.raises((ValueError, TypeError)) as error:
    options.ShampooOptions.from_kwargs(**{name: value})
  _names_argument_and_value(error.value, name, value)
  with pytest.raises(type(error.value)):  # the factory goes through the same path
    s4.scale_by_shampoo4(**{name: value})


@pytest.mark.parametrize("name, value", SOAP_ERRORS)
def test_soap_errors_name_argument_and_value(name, value):
  with pytest.raises((ValueError, TypeError)) as error:
    options.SoapOptions.from_kwargs(**{name: value})
  _names_argument_and_value(error.value, name, value)
  with pytest.raises(type(error.value)):
    s4.scale_by_soap4(**{name: value})


@pytest.mark.parametrize("kwargs, name", [
    (dict(state_format="naive", root_method="eigen"), "root_method"),
    (dict(state_format="eigen", root_method="jorge"), "state_format"),
    (dict(state_format="fp32", root_method="jorge", beta=1.0), "beta"),
    (dict(state_format="naive", root_method="jorge", beta=0.0), "beta"),
    (dict(store_root=False, state_format="fp32"), "store_root"),
    (dict(bits=4, quant_block=5), "quant_block"),
])
def test_shampoo_combinations_are_rejected(kwargs, name):
  with pytest.raises(ValueError, match=name):
    options.ShampooOptions.from_kwargs(**kwargs)


def test_shampoo_defaults_are_resolved():
  opts = options.ShampooOptions.from_kwargs()
  assert (opts.max_order, opts.bits, opts.quant_block, opts.min_quant_order) == (
      options.DEFAULT_MAX_ORDER, options.DEFAULT_BITS, options.DEFAULT_QUANT_BLOCK, options.DEFAULT_MIN_QUANT_ORDER)
  assert (opts.root_method, opts.refresh_method, opts.qr_iterations) == ("eigen", "adaptive", 1)
  assert options.ShampooOptions.from_kwargs(state_format="naive").root_method == "newton"
  assert opts.grafting.kind == "frobenius" and opts.grafting.per_block is False
  assert options.ShampooOptions.from_kwargs(grafting="adam").grafting.per_block is True
  assert opts.bjorck_steps == (1, 4) and isinstance(opts.bjorck_steps, tuple)


def test_soap_defaults_are_resolved():
  opts = options.SoapOptions.from_kwargs()
  assert (opts.precondition_every, opts.max_order, opts.max_precond_dim, opts.bits, opts.head_fraction) == (
      10, 1024, 10000, 4, 1 / 8)
  assert opts.shampoo_beta is None  # means b2 ** precondition_every (refresh statistic), b2 (dense)
  assert opts.quantized_from == opts.min_quant_order
  assert options.SoapOptions.from_kwargs(state_format="fp32").quantized_from > 10**9
  assert options.SoapOptions.from_kwargs(bits=3).bits == 3  # 3-bit bases are accepted (as documented)


@pytest.mark.parametrize("factory, option_class", [(s4.scale_by_shampoo4, options.ShampooOptions),
                                                    (s4.scale_by_soap4, options.SoapOptions)])
def test_factory_and_from_kwargs_have_the_same_keywords_and_defaults(factory, option_class):
  signature = {n: p.default for n, p in inspect.signature(factory).parameters.items()}
  resolved = {n: p.default for n, p in inspect.signature(option_class.from_kwargs).parameters.items()}
  assert signature == resolved


def test_options_are_frozen():
  opts = options.ShampooOptions.from_kwargs()
  with pytest.raises(AttributeError):
    opts.bits = 8


def test_injected_arrays_are_accepted_and_kept():
  beta = jnp.asarray(0.9)
  opts = options.ShampooOptions.from_kwargs(beta=beta, stats_every=jnp.asarray(3))
  assert opts.beta is beta
  with pytest.raises(ValueError, match="static_args"):
    options.ShampooOptions.from_kwargs(bits=jnp.asarray(4))


def test_check_param_dtypes_names_the_leaf():
  validation.check_param_dtypes({"w": jnp.zeros(3), "s": np.float32(1.0)}, "scale_by_soap4")
  with pytest.raises(TypeError, match=r"scale_by_soap4.*\['n'\].*int32"):
    validation.check_param_dtypes({"n": jnp.zeros(3, jnp.int32)}, "scale_by_soap4")
  with pytest.raises(TypeError, match="str"):
    validation.check_param_dtypes({"x": "text"}, "scale_by_shampoo4")


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=-1.0), "learning_rate"), (dict(learning_rate=1e-3, weight_decay=-1.0), "weight_decay"),
    (dict(learning_rate=1e-3, moment_bits=2), "moment_bits"),
])
def test_alias_options_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    options.check_alias_options(**kwargs)
