"""Float64 numpy references of the paper's algorithms, for tests only.

Written from the algorithm boxes (Alg. 1-4 of Wang et al. 2024), independently
of the library code, and without quantization.
"""

import numpy as np


def inverse_root(a, epsilon, p=4):
  """(A + epsilon * lambda_max I)^(-1/p) by an exact float64 eigendecomposition."""
  w, u = np.linalg.eigh(a)
  w = np.maximum(w, 0.0)
  return (u * (w + epsilon * w.max()) ** (-1.0 / p)) @ u.T


def graft(preconditioned, grad):
  return preconditioned * np.linalg.norm(grad) / (np.linalg.norm(preconditioned) + 1e-12)


def shampoo_alg4(grads, beta, epsilon, stats_every, root_every):
  """32-bit Shampoo (Alg. 4) on one matrix parameter; returns the grafted updates."""
  m, n = grads[0].shape
  left, right = epsilon * np.eye(m), epsilon * np.eye(n)
  left_root, right_root = np.eye(m), np.eye(n)
  outputs = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    if t % stats_every == 0:
      left = beta * left + (1 - beta) * g @ g.T
      right = beta * right + (1 - beta) * g.T @ g
    if t % root_every == 0:
      left_root, right_root = inverse_root(left, epsilon), inverse_root(right, epsilon)
    outputs.append(graft(left_root @ g @ right_root, g))
  return outputs


class _EigenFactor:
  """One factor of Alg. 1-3 without quantization: eigenvectors V, eigenvalues."""

  def __init__(self, order, epsilon):
    self.vecs = np.eye(order)
    self.vals = np.full(order, epsilon)
    self.root = np.eye(order)

  def update_stats(self, gram, beta):  # Alg. 1 with one warm-started QR step
    a = beta * (self.vecs * self.vals) @ self.vecs.T + (1 - beta) * gram
    q, r = np.linalg.qr(a @ self.vecs)
    self.vecs = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # orientation of A v_i
    self.vals = np.einsum("ij,ik,kj->j", self.vecs, a, self.vecs)
    # Columns by descending eigenvalue, so the next warm start keeps the dominant ones in front.
    order = np.argsort(-self.vals, kind="stable")
    self.vecs, self.vals = self.vecs[:, order], self.vals[order]

  def update_root(self, epsilon):  # Alg. 2
    vals = np.maximum(self.vals, 0.0)
    self.root = (self.vecs * (vals + epsilon * vals.max()) ** -0.25) @ self.vecs.T


def shampoo_alg3_unquantized(grads, beta, epsilon, stats_every, root_every):
  """4-bit Shampoo's eigen pipeline (Alg. 3) with exact storage, one QR step per T1; grafted updates."""
  m, n = grads[0].shape
  left, right = _EigenFactor(m, epsilon), _EigenFactor(n, epsilon)
  outputs = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    if t % stats_every == 0:
      left.update_stats(g @ g.T, beta)
      right.update_stats(g.T @ g, beta)
    if t % root_every == 0:
      left.update_root(epsilon)
      right.update_root(epsilon)
    outputs.append(graft(left.root @ g @ right.root, g))
  return outputs
