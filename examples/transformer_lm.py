"""Byte-level transformer LM: AdamW vs. AdamW + 32-bit / naive 4-bit / 4-bit Shampoo.

A small decoder-only (GPT-style, pre-LayerNorm) transformer in Flax NNX,
trained to predict the next byte of English technical prose: the help topics
of the Python language reference that ship with Python itself
(``pydoc_data.topics``, ~0.46 M bytes; no download). The topics are joined in
sorted order; the first 90% of the bytes are the training text and the last
10% the validation text (a fixed split). Validation loss (nats per byte) is
measured on 64 fixed, evenly spaced windows of the validation text.

Model: 2 blocks, d_model 128, 4 heads, MLP 512, context 64, vocabulary 256
(bytes), ~0.47 M parameters. Its weight matrices give Shampoo factors of
orders 512 (the MLP), 384 (fused QKV), 256 (byte embedding and output head),
128 and 64 (positions); all of order >= 64 are 4-bit in the 4-bit variants.

All four optimizers share the initialization, the minibatches, the schedule
(5% warm-up, cosine decay) and the hyperparameters. ``--save-preconditioner
PATH`` saves, for the ``+shampoo32`` run, the largest (order-512) float32
statistic from the final optimizer state to a ``.npy`` file (a real Shampoo
statistic, e.g. for quantization-error benchmarks). Defaults run in about
three minutes on two CPU cores:

  python examples/transformer_lm.py
  python examples/transformer_lm.py --steps 1000 --out /tmp/lm.json
  python examples/transformer_lm.py --optimizers adamw+shampoo32 --save-preconditioner /tmp/L512.npy
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  (examples/common.py)
import variants  # noqa: E402  (examples/variants.py)

OUTPUTS = pathlib.Path(__file__).resolve().parent / "outputs"  # git-ignored
VOCAB = 256  # bytes


def load_corpus() -> np.ndarray:
  """``uint8[n]``: the pydoc help topics, joined in sorted-key order, as UTF-8 bytes."""
  from pydoc_data.topics import topics

  text = "\n\n".join(topics[key] for key in sorted(topics))
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, d_model: int, num_heads: int, d_mlp: int, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.proj = nnx.Linear(d_model, d_model, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, d_mlp, rngs=rngs)
    self.mlp_out = nnx.Linear(d_mlp, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [batch, time, d_model]
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, self.num_heads, d // self.num_heads) for a in (q, k, v))
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))
    attention = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
    x = x + self.proj(attention.reshape(b, t, d))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class TransformerLM(nnx.Module):
  """Byte embedding + learned positions, ``num_layers`` blocks, final LayerNorm, output head."""

  def __init__(self, rngs: nnx.Rngs, context: int = 64, d_model: int = 128, num_heads: int = 4,
               d_mlp: int = 512, num_layers: int = 2):
    self.embed = nnx.Embed(VOCAB, d_model, rngs=rngs)
    self.positions = nnx.Embed(context, d_model, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, num_heads, d_mlp, rngs) for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, VOCAB, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:  # tokens: int[batch, time] -> logits
    x = self.embed(tokens) + self.positions(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def next_byte_loss(model: TransformerLM, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy (nats per byte) of predicting ``tokens[:, 1:]``."""
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def evaluate(model: TransformerLM, tokens: jax.Array) -> dict[str, jax.Array]:
  loss = next_byte_loss(model, tokens)
  return {"loss": loss, "bits_per_byte": loss / jnp.log(2.0)}


def windows(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
  """``int32[len(starts), length]``: the windows of ``data`` at ``starts``."""
  return data[starts[:, None] + np.arange(length)].astype(np.int32)


def save_largest_statistic(opt_state, model: nnx.Module, path: pathlib.Path) -> str:
  """Saves the largest-order float32 Shampoo statistic; returns where it came from.

  Only for the ``"fp32"`` state format, whose buckets are
  ``MatrixFactors(stats=f32[k, n, n], root=...)``; the first factor of the
  highest-order bucket is saved.
  """
  shampoo = [node for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, common.s4.ScaleByShampoo4State))
             if isinstance(node, common.s4.ScaleByShampoo4State)]
  (state,) = shampoo
  name = max(state.factors, key=lambda bucket: int(bucket.removeprefix("order").split("_")[0]))
  bucket = state.factors[name]
  if not isinstance(bucket, common.s4.MatrixFactors) or common.s4.factors.is_quantized(bucket.stats):
    raise ValueError("--save-preconditioner needs the dense fp32 state format")
  statistic = np.asarray(bucket.stats[0], dtype=np.float32)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.save(path, statistic)

  # Which parameter (and side) this factor preconditions, from the static plan.
  params = nnx.state(model, nnx.Param)
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  plan = common.s4.partition.make_plan([leaf.shape for _, leaf in paths_and_leaves], 1024,
                                       common.MIN_QUANT_ORDER, quantize=False)
  key = next(k for k in plan.buckets if k.name == name)
  leaf_index, _, side = plan.factor_slots()[key][0]
  source = f"{side} factor of {jax.tree_util.keystr(paths_and_leaves[leaf_index][0])}"
  eig = np.linalg.eigvalsh(statistic.astype(np.float64))
  print(f"saved {path}: {name} statistic ({source}), shape {statistic.shape}, "
        f"eigenvalues {eig.min():.3g} .. {eig.max():.3g}")
  return source


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_common_args(parser, steps=300, optimizers=variants.optimizer_names("adamw"), lr=3e-3,
                         weight_decay=0.01, batch_size=16, out=OUTPUTS / "transformer_lm.json")
  parser.add_argument("--context", type=int, default=64, help="tokens (bytes) per training sequence")
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--d-mlp", type=int, default=512)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--save-preconditioner", type=pathlib.Path, default=None, metavar="PATH",
                      help="after the +shampoo32 run, save its largest fp32 statistic to this .npy file")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
  """Runs the comparison; returns ``{optimizer: results}`` (see :func:`common.train`)."""
  args = parse_args(argv)
  corpus = load_corpus()
  split = int(0.9 * len(corpus))
  train_data, valid_data = corpus[:split], corpus[split:]
  length = args.context + 1  # inputs and shifted targets
  rng = np.random.default_rng(args.seed)
  train_starts = rng.integers(0, len(train_data) - length, size=(args.steps, args.batch_size))
  valid_tokens = windows(valid_data, np.linspace(0, len(valid_data) - length, 64).astype(np.int64), length)
  eval_every = args.eval_every or max(1, args.steps // 10)
  print(f"pydoc topics: {len(train_data):,} train / {len(valid_data):,} validation bytes; "
        f"transformer {args.layers} x d{args.d_model} (MLP {args.d_mlp}), context {args.context}; "
        f"{args.steps} steps of batch {args.batch_size}, peak lr {args.lr:g}, wd {args.weight_decay:g}, "
        f"seed {args.seed}; Shampoo T1={args.stats_every}, T2={args.root_every}, epsilon={args.epsilon:g}")

  def new_model():  # the same initialization for every optimizer
    return TransformerLM(nnx.Rngs(args.seed), context=args.context, d_model=args.d_model,
                         d_mlp=args.d_mlp, num_layers=args.layers)

  results, saved_from = {}, None
  for name in args.optimizers:
    model = new_model()
    results[name], optimizer = common.train(
        name, model, common.optimizer_from_args(name, args), next_byte_loss,
        ((windows(train_data, starts, length),) for starts in train_starts),
        lambda m: evaluate(m, valid_tokens), steps=args.steps, eval_every=eval_every)
    if args.save_preconditioner is not None and name.endswith("+shampoo32"):
      saved_from = save_largest_statistic(optimizer.opt_state, model, args.save_preconditioner)
  if args.save_preconditioner is not None and saved_from is None:
    print("--save-preconditioner: no +shampoo32 optimizer ran, nothing saved")

  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(new_model(), nnx.Param)))
  common.report(args, results, f"byte-level transformer LM on pydoc topics ({args.steps} steps, seed {args.seed})",
                [("loss", "valid loss", "{:.4f}"), ("bits_per_byte", "valid bpb", "{:.3f}")],
                num_params=int(num_params), train_bytes=len(train_data), valid_bytes=len(valid_data),
                corpus_sha256=hashlib.sha256(corpus.tobytes()).hexdigest(), python=sys.version.split()[0],
                eval_every=eval_every, saved_preconditioner_from=saved_from)
  return results


if __name__ == "__main__":
  main()
