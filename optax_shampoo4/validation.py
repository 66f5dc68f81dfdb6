"""Argument checks shared by the factories: clear errors at construction."""

from __future__ import annotations

from typing import Any

import jax
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
