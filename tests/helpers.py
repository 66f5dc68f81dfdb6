"""Shared test helpers: seed sweeps, slow-marked parametrize cases, float64 references.

Seed sweeps for the randomized numerical tests.

A tolerance that holds only for the seed it was tuned on is not a bound. Each
randomized numerical test takes its seed from :func:`sweep`: the default run
checks the original seed, the slow run (``python -m pytest -m slow``) 19 more,
so that such a tolerance shows up on this machine before it shows up on another.
"""

import pytest

SLOW_SEEDS = 19


def sweep(seed: int, count: int = SLOW_SEEDS):
  """``parametrize("seed", ...)``: ``seed`` in the default run, ``count`` more seeds marked slow."""
  extra = [pytest.param(seed + 1000 * (i + 1), marks=pytest.mark.slow, id=f"seed{seed + 1000 * (i + 1)}")
           for i in range(count)]
  return pytest.mark.parametrize("seed", [pytest.param(seed, id=f"seed{seed}")] + extra)


def mark_slow(cases, *slow_ids):
  """``cases`` for ``parametrize`` (values or ``pytest.param``s), those whose id is in ``slow_ids`` marked slow.

  The id of a plain value is ``str(value)`` (pytest's id of a string or a number); a ``pytest.param`` keeps its
  own id, values and marks."""
  out = []
  for case in cases:
    if isinstance(case, type(pytest.param(None))):
      if case.id in slow_ids:
        case = pytest.param(*case.values, id=case.id, marks=(*case.marks, pytest.mark.slow))
    elif str(case) in slow_ids:
      case = pytest.param(case, marks=pytest.mark.slow)
    out.append(case)
  return out
