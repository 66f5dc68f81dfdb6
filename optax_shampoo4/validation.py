"""Argument checks shared by the factories: clear errors at construction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_int(name: str, value: Any, minimum: int) -> None:
  """Raises ValueError unless ``value`` is a Python/numpy int >= ``minimum``."""
  if isinstance(value, jax.Array):
    raise ValueError(
        f"{name} must be a static Python int, got {name}={value!r}; with optax.inject_hyperparams, "
        f"list it in static_args")
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")


def static_int(name: str, value: Any, default: int, minimum: int) -> int:
  """``value`` checked by :func:`check_int`, or ``default`` when it is None.

  Shape-fixing options default to None so that ``optax.inject_hyperparams``
  (which turns every int/float argument into an array) leaves them alone.
  """
  if value is None:
    return default
  check_int(name, value, minimum)
  return int(value)


def check_traceable_int(name: str, value: Any, minimum: int) -> None:
  """An int >= ``minimum`` that may also be an integer array (e.g. injected, traced).

  Concrete values are checked; traced ones only for their dtype.
  """
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{name} must be an integer scalar, got {name}={value!r}")
    try:
      value = int(value)
    except jax.errors.ConcretizationTypeError:
      return
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")


def concrete_float(name: str, value: Any) -> float | None:
  """``float(value)`` for a concrete real scalar; None when it is traced."""
  try:
    return float(value)
  except jax.errors.ConcretizationTypeError:
    return None
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a real scalar, got {name}={value!r}") from e


def check_range(name: str, value: Any, low: float, high: float, high_inclusive: bool = False) -> None:
  """Checks ``low <= value < high`` (or ``<= high``) when ``value`` is concrete."""
  number = concrete_float(name, value)
  if number is None:
    return
  below_high = number <= high if high_inclusive else number < high
  if not (low <= number and below_high):  # also rejects NaN, and Inf when high is Inf
    closing = "]" if high_inclusive else ")"
    raise ValueError(f"{name} must be in [{low}, {high}{closing}, got {name}={value!r}")


def check_learning_rate(value: Any) -> None:
  """A learning rate is a schedule (callable) or a finite scalar >= 0."""
  if callable(value):
    return
  if isinstance(value, (str, bytes)):
    raise TypeError(f"learning_rate must be a real scalar or a schedule, got learning_rate={value!r}")
  check_range("learning_rate", value, 0.0, float("inf"))


def check_choice(name: str, value: Any, choices: tuple) -> None:
  """Raises ValueError unless ``value`` is one of the strings ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")


def check_bool(name: str, value: Any) -> bool:
  """``value`` as a bool; TypeError for anything but a Python or numpy bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {name}={value!r}")
  return bool(value)


def int_pair(name: str, value: Any) -> tuple[int, int]:
  """A static pair of ints >= 0 (e.g. ``bjorck_steps``); ValueError naming ``name`` otherwise."""
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in value)):
    raise ValueError(f"{name} must be a pair of ints >= 0, got {name}={value!r}")
  return (int(value[0]), int(value[1]))


def static_fraction(name: str, value: Any, default: float) -> float:
  """A static fraction in [0, 1) (None: ``default``), e.g. of a basis' rows."""
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a float in [0, 1), got {name}={value!r}")
  check_range(name, value, 0.0, 1.0)
  return float(value)


def check_param_dtypes(params: Any, owner: str) -> None:
  """Raises TypeError unless every leaf of ``params`` is a real floating-point array (or its shape struct).

  Args:
    params: the parameter tree given to ``init``.
    owner: the name of the transformation, for the message (e.g. ``"scale_by_shampoo4"``).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_shampoo4 import validation
    >>> validation.check_param_dtypes({"w": jnp.zeros(3)}, "scale_by_shampoo4")
    >>> validation.check_param_dtypes({"n": jnp.zeros(3, jnp.int32)}, "scale_by_shampoo4")
    Traceback (most recent call last):
    ...
    TypeError: scale_by_shampoo4 supports real floating-point parameters only; the leaf at ['n'] has dtype int32. Route it to another optimizer with optax.partition or optax.masked.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float, np.generic)):
      raise TypeError(
          f"{owner}.init needs parameter arrays (or jax.ShapeDtypeStruct); got "
          f"{type(leaf).__name__} at {jax.tree_util.keystr(path) or 'the root'}")
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner} supports real floating-point parameters only; the leaf at "
          f"{jax.tree_util.keystr(path)} has dtype {dtype}. Route it to another optimizer "
          f"with optax.partition or optax.masked.")
