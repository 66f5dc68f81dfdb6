"""What optax needs from the transforms: a typed constructor, and the placeholder of :func:`optax.tree.map_params`.

:func:`gradient_transformation` builds an :class:`optax.GradientTransformationExtraArgs` from step
functions typed with their own state.

``optax.tree.map_params(opt, f, state)`` calls ``opt.init`` on a leafless
placeholder object (optax's ``_ParamsPlaceholder``), then maps ``f`` over every
part of ``state`` that sits where the placeholder came back, and leaves the
rest alone (or hands it to ``transform_non_params``). A Shampoo state holds
both kinds: parameter-shaped trees (grafting accumulators, filtered
gradients), which ``init`` builds with ``jax.tree.map`` and which therefore
return the placeholder, and factor buckets, sized from the parameter shapes the
placeholder hides. For those, ``init`` puts :data:`NON_PARAMS`, an opaque leaf:
``map_params`` then returns the real buckets untouched (or passes the whole
``{bucket name: bucket}`` dictionary to ``transform_non_params``).
"""

from __future__ import annotations

from typing import Any, Callable

import optax


class _NonParams:
  """An opaque leaf standing for state parts that are not parameter-shaped."""

  def __repr__(self) -> str:
    return "NON_PARAMS"


NON_PARAMS = _NonParams()


def is_params_placeholder(tree: Any) -> bool:
  """Whether ``tree`` is the placeholder that ``optax.tree.map_params`` passes to ``init``."""
  try:
    from optax.tree_utils._state_utils import _ParamsPlaceholder  # private, hence the fallback
  except ImportError:  # pragma: no cover - other optax layouts
    return type(tree).__name__ == "_ParamsPlaceholder"
  return isinstance(tree, _ParamsPlaceholder)


def gradient_transformation(init: optax.TransformInitFn,
                            update: Callable[..., tuple[Any, Any]]) -> optax.GradientTransformationExtraArgs:
  """``optax.GradientTransformationExtraArgs(init, update)`` for step functions typed with their own state.

  optax's protocols type ``update``'s state as any ``OptState``; an ``update`` whose state parameter is
  its transform's NamedTuple accepts less, so a type checker rejects it (parameters are contravariant),
  although optax only ever passes it the state that ``init`` returned. Taking ``update`` as a callable
  of any signature here states that contract once.
  """
  return optax.GradientTransformationExtraArgs(init, update)
