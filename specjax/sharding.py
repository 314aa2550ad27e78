"""Device mesh and logical-axis sharding rules.

Arrays carry logical axis names (``specjax.params.param_specs``,
``specjax.kv_cache.CACHE_AXES``); :class:`ShardingRules` maps each logical name to a
mesh axis of a ``("data", "model")`` mesh: tensor parallelism over heads, KV heads, MLP
and vocabulary on "model", the batch on "data". An axis whose size does not divide by
its mesh axis is replicated instead (SmolLM2 has 9 query and 3 KV heads: on 8 devices
its attention is replicated while its MLP and vocabulary shard 8 ways).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from specjax import kv_cache
from specjax.config import ModelConfig
from specjax.params import param_specs, ParamSpec


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis name -> mesh axis name (or None: replicated)."""

  batch: str | None = "data"
  heads: str | None = "model"
  kv_heads: str | None = "model"
  mlp: str | None = "model"
  vocab: str | None = "model"
  embed: str | None = None
  head_dim: str | None = None
  layers: str | None = None
  sequence: str | None = None

  def spec(self, mesh: jax.sharding.Mesh, logical_axes: tuple[str, ...],
           shape: tuple[int, ...]) -> P:
    """PartitionSpec for an array, replicating axes that do not divide evenly."""
    out = []
    for name, dim in zip(logical_axes, shape):
      axis = getattr(self, name)
      if axis is not None and (axis not in mesh.shape or dim % mesh.shape[axis]):
        axis = None
      out.append(axis)
    return P(*out)


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> jax.sharding.Mesh:
  """A ("data", "model") mesh; ``model`` defaults to all remaining devices."""
  devices = jax.devices() if devices is None else devices
  if model is None:
    model = len(devices) // data
  if data * model > len(devices):
    raise ValueError(f"mesh ({data}, {model}) needs {data * model} devices; "
                     f"{len(devices)} are available.")
  grid = np.asarray(devices[:data * model]).reshape(data, model)
  return jax.sharding.Mesh(grid, ("data", "model"))


def param_shardings(cfg: ModelConfig, mesh, rules: ShardingRules = ShardingRules()):
  """A Params tree of NamedShardings, derived from the weight declarations."""
  return jax.tree.map(lambda s: NamedSharding(mesh, rules.spec(mesh, s.logical_axes, s.shape)),
                      param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))


def cache_shardings(cfg: ModelConfig, batch: int, size: int, mesh,
                    rules: ShardingRules = ShardingRules()) -> kv_cache.KVCache:
  """A KVCache tree of NamedShardings for a cache of the given batch and size."""
  kv = NamedSharding(mesh, rules.spec(mesh, kv_cache.CACHE_AXES,
                                      kv_cache.cache_shape(cfg, batch, size)))
  lengths = NamedSharding(mesh, rules.spec(mesh, ("batch",), (batch,)))
  return kv_cache.KVCache(k=kv, v=kv, lengths=lengths)


def batch_sharding(mesh, batch: int, ndim: int,
                   rules: ShardingRules = ShardingRules()) -> NamedSharding:
  """Sharding of a [B, ...] array: batch on its mesh axis, the rest replicated."""
  return NamedSharding(mesh, rules.spec(mesh, ("batch",) + ("sequence",) * (ndim - 1),
                                        (batch,) + (1,) * (ndim - 1)))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(params, cfg: ModelConfig, mesh, rules: ShardingRules = ShardingRules()):
  """Place a params tree on the mesh according to the rules."""
  return jax.device_put(params, param_shardings(cfg, mesh, rules))
