"""Seed sweeps for the randomized numerical tests.

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
