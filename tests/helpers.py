"""Shared test helpers: seed sweeps, slow-marked parametrize cases, float64 references.

Seed sweeps for the randomized numerical tests.

A tolerance that holds only for the seed it was tuned on is not a bound. Each
randomized numerical test takes its seed from :func:`sweep`: the default run
checks the original seed, the slow run (``python -m pytest -m slow``) 19 more,
so that such a tolerance shows up on this machine before it shows up on another.
"""

import numpy as np
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


# --- float64 numpy references shared by the linear-algebra tests ----------------------------------------------


def haar(n, rng):
  """A Haar-random n x n orthogonal matrix (float64)."""
  q, r = np.linalg.qr(rng.standard_normal((n, n)))
  return q * np.sign(np.diag(r))


def spd(eigvals, rng):
  """float32 U diag(eigvals) U^T for a Haar-random U, and its float64 copy."""
  u = haar(len(eigvals), rng)
  a32 = ((u * eigvals) @ u.T).astype(np.float32)
  a32 = (a32 + a32.T) / 2
  return a32, a32.astype(np.float64)


def inverse_root64(a, epsilon, p, lam_max=None):
  """(A + ε λmax I)^(-1/p) in float64, negative eigenvalues clipped to 0."""
  w, u = np.linalg.eigh(np.asarray(a, np.float64))
  w = np.maximum(w, 0.0)
  lam_max = w.max() if lam_max is None else lam_max
  return (u * (w + epsilon * lam_max) ** (-1.0 / p)) @ u.T


def rel(x, ref):
  """‖x − ref‖_F / ‖ref‖_F in float64."""
  x = np.asarray(x, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def polar64(v):
  """The nearest matrix with orthonormal columns to v (Frobenius), U_s V_sᵀ of its thin SVD, in float64."""
  u, _, vt = np.linalg.svd(np.asarray(v, np.float64), full_matrices=False)
  return u @ vt
