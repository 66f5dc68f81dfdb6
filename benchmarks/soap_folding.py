"""SOAP's statistic between refreshes: folded every step (dense, the reference) or at refreshes only (ours).

A float64 numpy SOAP on a small real task (an MLP 64-128-10 on scikit-learn's 8x8 digits, softmax
cross-entropy, minibatches of 32), comparing, at equal everything else:

* ``per-step fold``: dense statistics ``L <- b L + (1-b) G Gᵀ`` every step, the basis refreshed every
  ``f`` steps by sorting and one QR step of ``L Q`` (the SOAP reference; needs a float32 n×n
  accumulator per factor next to the basis);
* ``refresh fold``: what :func:`optax_shampoo4.scale_by_soap4` does (the statistic is the eigen-pair
  itself, ``A = b Q Λ Qᵀ + (1-b) G Gᵀ`` folded from the refresh step's gradient only, then one QR step);
* each with the first basis from one QR step (ours) or from an exact ``eigh`` (the reference);
* plain Adam (the same bias correction) as the first-order reference.

Prints the final training loss (mean over the last 10% of steps) per variant and peak learning rate
(cosine decay over the run), mean and spread over seeds, and writes
``benchmarks/results/soap_folding.json``. Takes a few minutes on one core:

  python benchmarks/soap_folding.py [--steps 600] [--seeds 0 1 2] [--lrs 1e-3 3e-3 1e-2] [--every 10]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

B1, B2, EPS = 0.95, 0.95, 1e-8


class Soap:
  """Float64 SOAP of one matrix parameter."""

  def __init__(self, shape, every, fold, init, beta):
    self.rows = [np.eye(d) for d in shape]  # eigenvectors as rows
    self.eigvals = [np.zeros(d) for d in shape]
    self.stats = [np.zeros((d, d)) for d in shape]  # dense statistics (per-step fold only)
    self.mu, self.nu = np.zeros(shape), np.zeros(shape)
    self.t, self.every, self.fold, self.init, self.beta = 0, every, fold, init, beta

  def direction(self, g):
    self.t += 1
    s = self.t - 1
    out = np.zeros_like(g)
    if s > 0:
      left, right = self.rows
      gp = left @ g @ right.T
      self.mu = B1 * self.mu + (1 - B1) * gp
      self.nu = B2 * self.nu + (1 - B2) * gp**2
      out = left.T @ (np.sqrt(1 - B2**s) / (1 - B1**s) * self.mu / (np.sqrt(self.nu) + EPS)) @ right
    grams = (g @ g.T, g.T @ g)
    if self.fold == "step":
      self.stats = [self.beta * a + (1 - self.beta) * m for a, m in zip(self.stats, grams)]
    if s == 0 or s % self.every == 0:
      old = list(self.rows)
      for i in range(2):
        if self.fold == "step":
          a = self.stats[i]
          order = np.argsort(-np.sum(self.rows[i] * (self.rows[i] @ a), axis=1), kind="stable")
        else:
          order = np.argsort(-self.eigvals[i], kind="stable")
        rows = self.rows[i][order]
        old[i] = rows
        self.nu = self.nu[order] if i == 0 else self.nu[:, order]
        self.mu = self.mu[order] if i == 0 else self.mu[:, order]
        if self.fold == "refresh":
          a = self.beta * rows.T @ np.diag(self.eigvals[i][order]) @ rows + (1 - self.beta) * grams[i]
        if s == 0 and self.init == "eigh":
          w, v = np.linalg.eigh(a)
          q = v[:, ::-1]
        else:
          q = np.linalg.qr(a @ rows.T)[0]
        self.rows[i], self.eigvals[i] = q.T, np.sum(q * (a @ q), axis=0)
      self.mu = (self.rows[0] @ old[0].T) @ self.mu @ (old[1] @ self.rows[1].T)
    return out


class Adam:
  def __init__(self, shape):
    self.mu, self.nu, self.t = np.zeros(shape), np.zeros(shape), 0

  def direction(self, g):
    self.t += 1
    self.mu = B1 * self.mu + (1 - B1) * g
    self.nu = B2 * self.nu + (1 - B2) * g**2
    return np.sqrt(1 - B2**self.t) / (1 - B1**self.t) * self.mu / (np.sqrt(self.nu) + EPS)


def mlp_loss_and_grads(params, x, y):
  w1, b1, w2, b2 = params
  h = np.tanh(x @ w1 + b1)
  logits = h @ w2 + b2
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=1, keepdims=True)
  n = len(y)
  loss = -np.mean(np.log(p[np.arange(n), y] + 1e-30))
  d = p.copy()
  d[np.arange(n), y] -= 1
  d /= n
  gw2, gb2 = h.T @ d, d.sum(0)
  dh = (d @ w2.T) * (1 - h**2)
  return loss, [x.T @ dh, dh.sum(0), gw2, gb2]


def train(variant, seed, steps, lr, every, beta):
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float64)
  rng = np.random.default_rng(seed)
  params = [rng.standard_normal((64, 128)) / 8, np.zeros(128), rng.standard_normal((128, 10)) / np.sqrt(128),
            np.zeros(10)]
  opts = []
  for p in params:
    if variant == "adam" or p.ndim == 1:
      opts.append(Adam(p.shape))
    else:
      fold, init = variant.split("/")
      opts.append(Soap(p.shape, every, fold, init, beta))
  losses = []
  for step in range(steps):
    idx = rng.integers(0, len(x), 32)
    loss, grads = mlp_loss_and_grads(params, x[idx], y[idx])
    losses.append(loss)
    scale = lr * 0.5 * (1 + np.cos(np.pi * step / steps))  # cosine decay
    params = [p - scale * o.direction(g) for p, o, g in zip(params, opts, grads)]
  return float(np.mean(losses[-max(10, steps // 10):]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
  parser.add_argument("--every", type=int, default=10)
  parser.add_argument("--beta", type=float, default=B2, help="shampoo_beta")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "soap_folding.json"))
  args = parser.parse_args(argv)
  variants = ["adam", "step/eigh", "step/qr", "refresh/eigh", "refresh/qr"]
  labels = {"adam": "Adam", "step/eigh": "per-step fold, eigh init (reference SOAP)",
            "step/qr": "per-step fold, QR init", "refresh/eigh": "refresh fold, eigh init",
            "refresh/qr": "refresh fold, QR init (scale_by_soap4)"}
  results = {}
  for lr in args.lrs:
    print(f"peak lr {lr:g}: final train loss, mean ± half range over seeds {args.seeds}")
    results[str(lr)] = {}
    for v in variants:
      finals = [train(v, seed, args.steps, lr, args.every, args.beta) for seed in args.seeds]
      r = results[str(lr)][v] = {"label": labels[v], "per_seed": finals, "mean": float(np.mean(finals)),
                                 "half_range": float((max(finals) - min(finals)) / 2)}
      print(f"  {labels[v]:44s} {r['mean']:.4f} ± {r['half_range']:.4f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  settings = vars(args) | {"out": out.name}  # no machine paths in the results
  out.write_text(json.dumps({"settings": settings | {"b1": B1, "b2": B2, "eps": EPS,
                                                       "task": "MLP 64-128-10 on sklearn digits, batch 32"},
                             "results": results}, indent=1))
  print(f"wrote {out}")
  return results


if __name__ == "__main__":
  main()
