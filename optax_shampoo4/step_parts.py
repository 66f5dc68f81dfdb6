"""The parts of an optimizer step that every optimizer of the library shares: the :class:`Step` its update starts
from (:meth:`~optax_shampoo4.engine.FactorEngine.start_step`), the state's failure counters, the untaken branch of a
gated refresh and the gradients' matrix views.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_shampoo4 import partition, sharding


class Step(NamedTuple):
  """What every optimizer step starts from (:meth:`FactorEngine.start_step`).

  Attributes:
    leaves: the gradient leaves, in tree order.
    treedef: the gradient tree's structure.
    plan: the static plan of the gradient tree.
    count: ``int32[]``, this step's number (the state's count plus one, saturating).
    matrices: per leaf, its float32 matrix view (None for passthrough leaves).
    grads_finite: ``bool[]``, whether every gradient element is finite.
  """

  leaves: list
  treedef: Any
  plan: partition.Plan
  count: jax.Array
  matrices: list
  grads_finite: jax.Array


def failure_counts(state: Any, grads_finite: jax.Array, refresh_due: jax.Array,
                   failures: jax.Array) -> dict[str, jax.Array]:
  """The state's failure counters after a step, as keyword arguments of the new state.

  Args:
    state: the previous state (with ``nonfinite_steps``, ``skipped_stats``, ``failed_refreshes``).
    grads_finite: whether this step's gradient was finite.
    refresh_due: whether this step was due to refresh the statistics.
    failures: factor refreshes rejected as non-finite in this step.

  Returns:
    ``{"nonfinite_steps", "skipped_stats", "failed_refreshes"}``.
  """
  nonfinite = ~grads_finite
  return dict(nonfinite_steps=state.nonfinite_steps + nonfinite.astype(jnp.int32),
              skipped_stats=state.skipped_stats + (refresh_due & nonfinite).astype(jnp.int32),
              failed_refreshes=state.failed_refreshes + failures)


def no_refresh(buckets: dict) -> tuple[dict, jax.Array]:
  """The untaken branch of a gated refresh: same buckets, no failures."""
  return buckets, jnp.zeros([], jnp.int32)


def matrix_views(leaves: list, plan: partition.Plan) -> list:
  """Per leaf, its float32 matrix view (None for passthrough leaves)."""
  return [sharding.reshape(leaf.astype(jnp.float32), lp.view_shape) if lp.preconditioned else None
          for leaf, lp in zip(leaves, plan.leaves)]


def all_finite(leaves: list) -> jax.Array:
  """Whether every element of every leaf is finite (a scalar bool)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or [True]))
