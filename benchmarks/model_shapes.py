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


def _llama(d: int, layers: int, ffn: int, vocab: int = 32000) -> dict:
  """LLaMA decoder (HF ``LlamaForCausalLM`` layout, Flax ``(in, out)`` kernels).

  No biases, RMSNorm scales only, rotary positions (no position table) and an
  untied ``lm_head`` (HF ``tie_word_embeddings=False``, as in GaLore's configs).
  """
  layer = {
      "input_layernorm": {"scale": _f32(d)},
      "self_attn": {name: {"kernel": _f32(d, d)} for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
      "post_attention_layernorm": {"scale": _f32(d)},
      "mlp": {"gate_proj": {"kernel": _f32(d, ffn)}, "up_proj": {"kernel": _f32(d, ffn)},
              "down_proj": {"kernel": _f32(ffn, d)}},
  }
  return {"embed_tokens": _f32(vocab, d), "layers": [layer] * layers,
          "norm": {"scale": _f32(d)}, "lm_head": {"kernel": _f32(d, vocab)}}


def llama_130m() -> dict:
  """GaLore ``configs/llama_130m.json``: d=768, 12 layers, 12 heads, ffn 2048, vocab 32000 (134M)."""
  return _llama(768, 12, 2048)


def llama_350m() -> dict:
  """GaLore ``configs/llama_350m.json``: d=1024, 24 layers, 16 heads, ffn 2736, vocab 32000 (368M)."""
  return _llama(1024, 24, 2736)


def llama_7b() -> dict:
  """LLaMA-2-7B (= GaLore ``configs/llama_7b.json``): d=4096, 32 layers, 32 heads, ffn 11008 (6.74B)."""
  return _llama(4096, 32, 11008)


def _dense(n_in: int, n_out: int, bias: bool = True) -> dict:
  tree = {"kernel": _f32(n_in, n_out)}
  if bias:
    tree["bias"] = _f32(n_out)
  return tree


def _ln(d: int) -> dict:
  return {"scale": _f32(d), "bias": _f32(d)}


def vit_s16() -> dict:
  """ViT-S/16 at 224x224, 1000 classes (timm ``vit_small_patch16_224``; 22.1M).

  d=384, 12 blocks, 6 heads, MLP 1536, class token and learned positions
  (197 tokens). Flax layout: patch-embedding conv kernel ``(16, 16, 3, 384)``.
  """
  d, depth, mlp, tokens, classes = 384, 12, 1536, 197, 1000
  block = {"norm1": _ln(d), "attn": {"qkv": _dense(d, 3 * d), "proj": _dense(d, d)},
           "norm2": _ln(d), "mlp": {"fc1": _dense(d, mlp), "fc2": _dense(mlp, d)}}
  return {"patch_embed": {"kernel": _f32(16, 16, 3, d), "bias": _f32(d)},
          "cls_token": _f32(1, 1, d), "pos_embed": _f32(1, tokens, d),
          "blocks": [block] * depth, "norm": _ln(d), "head": _dense(d, classes)}


def resnet34() -> dict:
  """ResNet-34 for ImageNet (torchvision layout of blocks, 1000 classes; 21.8M).

  Flax layout: conv kernels ``(kh, kw, in, out)``, no conv biases, BatchNorm
  scale/bias only (running statistics are not parameters). With the most
  nearly square reshape a Flax ``(3, 3, in, out)`` kernel becomes
  ``(9 in, out)`` and a PyTorch ``(out, in, 3, 3)`` one ``(out, 9 in)``: the
  same factor orders, so the optimizer-state bytes do not depend on the layout.
  """
  def bn(c):
    return {"scale": _f32(c), "bias": _f32(c)}

  params = {"conv1": {"kernel": _f32(7, 7, 3, 64)}, "bn1": bn(64)}
  c_in = 64
  for stage, (c, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
    for b in range(blocks):
      block = {"conv1": {"kernel": _f32(3, 3, c_in, c)}, "bn1": bn(c),
               "conv2": {"kernel": _f32(3, 3, c, c)}, "bn2": bn(c)}
      if b == 0 and c_in != c:  # stride-2 stage entry: 1x1 projection shortcut
        block["downsample"] = {"kernel": _f32(1, 1, c_in, c), "bn": bn(c)}
      params[f"layer{stage}_{b}"] = block
      c_in = c
  params["fc"] = _dense(512, 1000)
  return params


def swin_t() -> dict:
  """Swin-T for ImageNet: patch 4, window 7, C=96, depths (2, 2, 6, 2), heads (3, 6, 12, 24) (28.3M).

  timm ``swin_tiny_patch4_window7_224`` tensors in Flax layout; the relative
  position bias tables ``(169, heads)`` are matrices and get preconditioned.
  """
  c, window, classes = 96, 7, 1000
  params = {"patch_embed": {"kernel": _f32(4, 4, 3, c), "bias": _f32(c), "norm": _ln(c)}}
  for stage, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
    block = {"norm1": _ln(c),
             "attn": {"relative_position_bias_table": _f32((2 * window - 1) ** 2, heads),
                      "qkv": _dense(c, 3 * c), "proj": _dense(c, c)},
             "norm2": _ln(c), "mlp": {"fc1": _dense(c, 4 * c), "fc2": _dense(4 * c, c)}}
    layer = {"blocks": [block] * depth}
    if stage < 3:  # patch merging: LayerNorm(4C) then a bias-free 4C -> 2C projection
      layer["downsample"] = {"norm": _ln(4 * c), "reduction": _dense(4 * c, 2 * c, bias=False)}
      params[f"layers_{stage}"] = layer
      c *= 2
    else:
      params[f"layers_{stage}"] = layer
  params["norm"] = _ln(c)
  params["head"] = _dense(c, classes)
  return params


MODELS = {
    "gpt2_124m": gpt2_124m,
    "llama_130m": llama_130m,
    "llama_350m": llama_350m,
    "llama_7b": llama_7b,
    "vit_s16": vit_s16,
    "resnet34": resnet34,
    "swin_t": swin_t,
}

# The paper's maximum preconditioner order per model (App. G / H.2): 1200 by
# default, 10000 for LLaMA-130M, 2048 for the LLaMA2-7B memory test (Table 13).
PAPER_MAX_ORDER = {
    "gpt2_124m": 1200,
    "llama_130m": 10000,
    "llama_350m": 1200,
    "llama_7b": 2048,
    "vit_s16": 1200,
    "resnet34": 1200,
    "swin_t": 1200,
}
