"""Tests of ``optax_shampoo4/validation.py``: each check accepts what it documents, rejects the rest with the
argument's name and value in the message, and leaves traced values alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_shampoo4 import validation as v


@pytest.mark.parametrize("value", [3, np.int32(3), 10**6])
def test_check_int_accepts_ints_at_or_above_the_minimum(value):
  v.check_int("order", value, 3)


@pytest.mark.parametrize("value", [2, 3.0, True, "3", None, np.float32(4)])
def test_check_int_rejects_naming_the_argument(value):
  with pytest.raises(ValueError, match=r"order must be an int >= 3, got order="):
    v.check_int("order", value, 3)


def test_check_int_rejects_arrays_pointing_at_static_args():
  with pytest.raises(ValueError, match="order must be a static Python int.*static_args"):
    v.check_int("order", jnp.int32(4), 1)


def test_static_int_default_and_conversion():
  assert v.static_int("block", None, 1024, 1) == 1024
  out = v.static_int("block", np.int64(7), 1024, 1)
  assert out == 7 and type(out) is int
  with pytest.raises(ValueError, match="block must be an int >= 1, got block=0"):
    v.static_int("block", 0, 1024, 1)


def test_check_traceable_int_concrete_arrays_and_tracers():
  v.check_traceable_int("every", 5, 1)
  v.check_traceable_int("every", jnp.int32(5), 1)
  with pytest.raises(ValueError, match="every must be an int >= 1, got every="):
    v.check_traceable_int("every", jnp.int32(0), 1)
  with pytest.raises(ValueError, match="every must be an integer scalar"):
    v.check_traceable_int("every", jnp.float32(5), 1)
  with pytest.raises(ValueError, match="every must be an integer scalar"):
    v.check_traceable_int("every", np.array([5]), 1)
  with pytest.raises(ValueError, match="every must be an int >= 1"):
    v.check_traceable_int("every", True, 1)
  # Traced: only the dtype can be checked; a traced 0 passes, a traced float does not.
  jax.jit(lambda x: v.check_traceable_int("every", x, 1) or x)(jnp.int32(0))
  with pytest.raises(ValueError, match="integer scalar"):
    jax.jit(lambda x: v.check_traceable_int("every", x, 1) or x)(jnp.float32(0))


def test_concrete_float():
  assert v.concrete_float("beta", 0.5) == 0.5
  assert v.concrete_float("beta", jnp.float32(0.25)) == 0.25
  seen = []
  jax.jit(lambda x: seen.append(v.concrete_float("beta", x)) or x)(jnp.float32(0.5))
  assert seen == [None]
  with pytest.raises(TypeError, match="beta must be a real scalar, got beta='x'"):
    v.concrete_float("beta", "x")
  with pytest.raises(TypeError, match="beta must be a real scalar"):
    v.concrete_float("beta", jnp.ones(3))


def test_check_range_bounds_nan_and_inclusivity():
  v.check_range("beta", 0.0, 0.0, 1.0)
  with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\), got beta=1.0"):
    v.check_range("beta", 1.0, 0.0, 1.0)
  v.check_range("beta", 1.0, 0.0, 1.0, high_inclusive=True)
  with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\], got beta=1.5"):
    v.check_range("beta", 1.5, 0.0, 1.0, high_inclusive=True)
  with pytest.raises(ValueError, match="beta must be in"):
    v.check_range("beta", -1e-9, 0.0, 1.0)
  with pytest.raises(ValueError, match="beta must be in"):
    v.check_range("beta", float("nan"), 0.0, 1.0)
  jax.jit(lambda x: v.check_range("beta", x, 0.0, 1.0) or x)(jnp.float32(5.0))  # traced: not checked


def test_check_learning_rate():
  v.check_learning_rate(0.0)
  v.check_learning_rate(1e3)
  v.check_learning_rate(lambda count: 0.1)
  for bad in (-1e-3, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="learning_rate must be in"):
      v.check_learning_rate(bad)
  for text in ("fast", "0.1"):  # float() would parse "0.1": a string is still not a learning rate
    with pytest.raises(TypeError, match="learning_rate must be a real scalar"):
      v.check_learning_rate(text)
