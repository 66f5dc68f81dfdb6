"""Parameter trees of well-known models as ``jax.ShapeDtypeStruct`` leaves.

Only shapes: nothing is allocated, so optimizer states of large models can be
measured with ``jax.eval_shape``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def gpt2_124m() -> dict:
  """GPT-2 small: 12 layers, d=768, vocab 50257, context 1024, tied embeddings."""
  d, vocab, ctx, layers = 768, 50257, 1024, 12
  block = {
      "ln_1": {"scale": _f32(d), "bias": _f32(d)},
      "attn": {"c_attn": {"kernel": _f32(d, 3 * d), "bias": _f32(3 * d)},
               "c_proj": {"kernel": _f32(d, d), "bias": _f32(d)}},
      "ln_2": {"scale": _f32(d), "bias": _f32(d)},
      "mlp": {"c_fc": {"kernel": _f32(d, 4 * d), "bias": _f32(4 * d)},
              "c_proj": {"kernel": _f32(4 * d, d), "bias": _f32(d)}},
  }
  return {"wte": _f32(vocab, d), "wpe": _f32(ctx, d), "h": [block] * layers,
          "ln_f": {"scale": _f32(d), "bias": _f32(d)}}


MODELS = {"gpt2_124m": gpt2_124m}
