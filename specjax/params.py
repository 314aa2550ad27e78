"""Parameter pytrees of the Llama-family decoder.

Every weight is declared once, in :func:`param_specs`, with its shape, logical axes
and initializer; random init, abstract (shape-only) trees and shardings are all
derived from that one declaration. Decoder blocks are stacked on a leading "layers"
axis so the forward pass can ``lax.scan`` over them.

Layout (E = embed, H = heads, K = kv_heads, D = head_dim, F = mlp, V = vocab, L = layers)::

  embedding  [V, E]          ("vocab", "embed")
  layers.attn_norm [L, E]
  layers.wq  [L, E, H, D]    ("layers", "embed", "heads", "head_dim")
  layers.wk  [L, E, K, D]    ("layers", "embed", "kv_heads", "head_dim")
  layers.wv  [L, E, K, D]
  layers.wo  [L, H, D, E]
  layers.mlp_norm [L, E]
  layers.w_gate, layers.w_up [L, E, F]   ("layers", "embed", "mlp")
  layers.w_down [L, F, E]
  final_norm [E]
  lm_head    [E, V] or None when embeddings are tied.

Q/K weights use the Hugging Face ("rotate half") RoPE layout; loaders of llama.cpp
GGUF files undo llama.cpp's row permutation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from specjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Declaration of one weight: shape, logical axis names and an initializer."""

  shape: tuple[int, ...]
  logical_axes: tuple[str, ...]
  init: Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerParams:
  """The weights of all decoder blocks, stacked on a leading layers axis."""

  attn_norm: Any  # [L, E]
  wq: Any  # [L, E, H, D]
  wk: Any  # [L, E, K, D]
  wv: Any  # [L, E, K, D]
  wo: Any  # [L, H, D, E]
  mlp_norm: Any  # [L, E]
  w_gate: Any  # [L, E, F]
  w_up: Any  # [L, E, F]
  w_down: Any  # [L, F, E]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
  """All weights of the decoder."""

  embedding: Any  # [V, E]
  layers: LayerParams
  final_norm: Any  # [E]
  lm_head: Any  # [E, V], or None when tied to the embedding


def _ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def _normal(fan_in_axes: tuple[int, ...]):
  """Scaled normal init (std = 1/sqrt(fan_in)); fan_in_axes index into the shape."""

  def init(key, shape, dtype):
    fan_in = int(np.prod([shape[a] for a in fan_in_axes]))
    return (jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

  return init


def param_specs(cfg: ModelConfig) -> Params:
  """The one declaration of every weight (a Params tree of ParamSpec leaves)."""
  L, E, H, K, D, F, V = (cfg.num_layers, cfg.embed, cfg.num_heads, cfg.num_kv_heads,
                         cfg.head_dim, cfg.mlp_dim, cfg.vocab_size)
  layers = LayerParams(
      attn_norm=ParamSpec((L, E), ("layers", "embed"), _ones),
      wq=ParamSpec((L, E, H, D), ("layers", "embed", "heads", "head_dim"), _normal((1,))),
      wk=ParamSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), _normal((1,))),
      wv=ParamSpec((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), _normal((1,))),
      wo=ParamSpec((L, H, D, E), ("layers", "heads", "head_dim", "embed"), _normal((1, 2))),
      mlp_norm=ParamSpec((L, E), ("layers", "embed"), _ones),
      w_gate=ParamSpec((L, E, F), ("layers", "embed", "mlp"), _normal((1,))),
      w_up=ParamSpec((L, E, F), ("layers", "embed", "mlp"), _normal((1,))),
      w_down=ParamSpec((L, F, E), ("layers", "mlp", "embed"), _normal((1,))),
  )
  return Params(
      embedding=ParamSpec((V, E), ("vocab", "embed"), _normal((1,))),
      layers=layers,
      final_norm=ParamSpec((E,), ("embed",), _ones),
      lm_head=None if cfg.tie_embeddings else ParamSpec((E, V), ("embed", "vocab"),
                                                        _normal((0,))),
  )


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random weights (for tests and tiny experiments) in ``cfg.param_dtype``."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))
  arrays = [s.init(k, s.shape, cfg.weight_dtype) for s, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, arrays)


def abstract_params(cfg: ModelConfig, shardings: Params | None = None) -> Params:
  """ShapeDtypeStructs of every weight (optionally carrying shardings), for AOT
  compilation, memory estimates and orbax restores."""
  specs = param_specs(cfg)
  if shardings is None:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.weight_dtype), specs,
                        is_leaf=_is_spec)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, cfg.weight_dtype,
                                                         sharding=sh),
                      specs, shardings, is_leaf=_is_spec)


def logical_axes(cfg: ModelConfig) -> Params:
  """A Params tree whose leaves are the logical axis-name tuples."""
  return jax.tree.map(lambda s: s.logical_axes, param_specs(cfg), is_leaf=_is_spec)


def param_bytes(cfg: ModelConfig) -> int:
  """Bytes of all weights in ``cfg.param_dtype``."""
  itemsize = jnp.dtype(cfg.weight_dtype).itemsize
  specs = jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec)
  return sum(int(np.prod(s.shape)) * itemsize for s in specs)


def check_params(cfg: ModelConfig, params: Params) -> None:
  """Raise ValueError if a params tree does not match the config's declaration."""
  specs = param_specs(cfg)
  spec_leaves, spec_def = jax.tree.flatten(specs, is_leaf=_is_spec)
  leaves, treedef = jax.tree.flatten(params)
  if spec_def != treedef:
    raise ValueError(f"params structure {treedef} does not match config {spec_def}.")
  for path_spec, leaf in zip(jax.tree_util.tree_flatten_with_path(specs, is_leaf=_is_spec)[0],
                             leaves):
    path, spec = path_spec
    if tuple(leaf.shape) != spec.shape:
      raise ValueError(f"param {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)};"
                       f" the config declares {spec.shape}.")
  del spec_leaves
