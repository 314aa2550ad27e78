"""pallas_kernels.tree_attention against its reference and specjax's XLA attention.

Each kernel runs compiled on its own hardware (the Triton kernel on a GPU, the Mosaic
kernel on a TPU) and otherwise in Pallas interpret mode on the CPU: the Triton kernel
through the generic interpreter, the Mosaic kernel through the TPU interpreter (which
fills memory outside a buffer with NaN, so a read past the cache that reaches the
output fails the test). Interpret mode checks the math, not the hardware tiling rules,
so ``test_kernels_lower_for_their_hardware`` also lowers both kernels for CUDA and TPU
(lowering needs no device).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tree_attention as ta
from specjax import attention as xla

_TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # atol = rtol, per dtype


def _ancestor_mask(parents) -> np.ndarray:
  """bool[n, n]: node i sees node j iff j is i or an ancestor of i (parents first)."""
  mask = np.eye(len(parents), dtype=bool)
  for i, parent in enumerate(parents):
    if parent >= 0:
      mask[i] |= mask[parent]
  return mask


#       0          A tree of 6 tokens: node 0 is the root; 1, 2 its children;
#      / \         3, 4 the children of 1; 5 the child of 2.
#     1   2
#    / \   \
#   3   4   5
_TREE_MASK = _ancestor_mask([-1, 0, 0, 1, 1, 2])


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention call: shapes, per-row lengths, window, dtype and the new mask."""

  T: int
  H: int
  K: int
  D: int
  S: int
  lengths: tuple[int, ...]
  window: tuple[int, int] | None = None  # (sinks, recent)
  dtype: type = jnp.float32
  mask: str = "causal"  # "causal", "tree" (_TREE_MASK) or "batched"
  block_k: int = 16
  num_splits: int | None = None
  block_rows: int = 64

  def __str__(self):
    return (f"T{self.T}-G{self.H // self.K}-S{self.S}-bk{self.block_k}-"
            f"{'win' if self.window else 'full'}-{self.mask}-{jnp.dtype(self.dtype).name}")


def _inputs(case: Case, seed: int):
  """Fresh random q, k_new, v_new, k_cache, v_cache, lengths, new_mask for a case."""
  rng = np.random.default_rng(seed)
  B = len(case.lengths)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape), case.dtype)

  if case.mask == "causal":
    mask = np.tril(np.ones((case.T, case.T), bool))
  elif case.mask == "tree":
    mask = _TREE_MASK
  else:  # Per row: a causal chain, a random tree and a random lower-triangular mask.
    mask = np.tril(rng.random((B, case.T, case.T)) < 0.5)
    mask[:, np.arange(case.T), np.arange(case.T)] = True  # A token sees itself.
    mask[0] = np.tril(np.ones((case.T, case.T), bool))
  return (normal(B, case.T, case.H, case.D), normal(B, case.T, case.K, case.D),
          normal(B, case.T, case.K, case.D), normal(B, case.K, case.S, case.D),
          normal(B, case.K, case.S, case.D), jnp.asarray(case.lengths, jnp.int32),
          jnp.asarray(mask))


def _window_kwargs(case: Case) -> dict:
  return {} if case.window is None else dict(sinks=case.window[0], recent=case.window[1])


def _assert_close(actual, expected, dtype):
  tol = _TOLERANCE[dtype]
  assert actual.dtype == expected.dtype
  np.testing.assert_allclose(np.asarray(actual, np.float32),
                             np.asarray(expected, np.float32), atol=tol, rtol=tol)


def _reference(args, case: Case):
  # Full f32 products on GPUs too (their default f32 dot is TF32), like the kernels.
  with jax.default_matmul_precision("float32"):
    return ta.tree_attention_reference(*args, **_window_kwargs(case))


def _xla(args, case: Case):
  """specjax's XLA attention. XLA:CPU (jaxlib 0.10) has no batched bf16 x bf16 -> f32
  dot for K > 1, so bf16 inputs run upcast there (test_reference_matches_xla_in_bf16
  covers the bf16 path itself with K = 1)."""
  window = None if case.window is None else xla.Window(*case.window)
  if case.dtype == jnp.bfloat16 and case.K > 1:
    args = [x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in args]
  with jax.default_matmul_precision("float32"):
    out = jax.jit(functools.partial(xla.attention, window=window))(*args)
  return out.astype(case.dtype)


def _tree_attention(*args, backend: str, **kwargs):
  """The kernel compiled on its own hardware ("gpu", "tpu"), else interpreted on CPU."""
  if jax.default_backend() == backend:
    return ta.tree_attention(*args, backend=backend, **kwargs)
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    return ta.tree_attention(*jax.device_put(args, cpu), backend=backend, interpret=True,
                             **kwargs)


def _check_kernel(case: Case, backend: str, seed: int):
  args = _inputs(case, seed)
  out = _tree_attention(*args, **_window_kwargs(case), block_k=case.block_k,
                        num_splits=case.num_splits, block_rows=case.block_rows,
                        backend=backend)
  assert out.shape == args[0].shape and out.dtype == case.dtype
  assert np.isfinite(np.asarray(out, np.float32)).all()
  _assert_close(out, _reference(args, case), case.dtype)
  _assert_close(out, _xla(args, case), case.dtype)


# Every case has a row of length 0 or lengths that are not multiples of block_k; each
# T in {1, 4, 16, 64}, G in {1, 3, 4, 8}, both dtypes, both mask forms and the tree
# appear, as do caches whose S is not a multiple of block_k or smaller than one block.
_TRITON_CASES = [
    Case(T=1, H=4, K=4, D=32, S=40, lengths=(0, 1, 17, 40)),
    Case(T=1, H=6, K=2, D=32, S=100, lengths=(0, 5, 37, 100), window=(4, 20),
         dtype=jnp.bfloat16),
    Case(T=4, H=8, K=1, D=64, S=300, lengths=(0, 299, 64, 130), window=(1, 50),
         dtype=jnp.bfloat16, block_k=64),
    Case(T=4, H=4, K=2, D=32, S=20, lengths=(0, 20, 7), block_k=32),  # S < block_k
    Case(T=6, H=6, K=2, D=32, S=64, lengths=(16, 0, 63), mask="tree"),
    Case(T=16, H=8, K=2, D=32, S=150, lengths=(0, 150, 77), window=(8, 32),
         dtype=jnp.bfloat16, mask="batched", block_k=32),
    Case(T=16, H=6, K=2, D=32, S=90, lengths=(45, 89, 1), mask="batched",
         num_splits=3, block_rows=16),  # 48 rows in 3 blocks of 16
    Case(T=64, H=8, K=1, D=32, S=96, lengths=(96, 50), window=(4, 16), block_k=32),
    Case(T=64, H=2, K=2, D=32, S=70, lengths=(0, 70, 33), dtype=jnp.bfloat16,
         mask="batched"),
]

_MOSAIC_CASES = [
    Case(T=1, H=4, K=4, D=32, S=40, lengths=(0, 1, 17, 40)),
    Case(T=4, H=8, K=2, D=32, S=100, lengths=(0, 99, 38), window=(3, 20),
         dtype=jnp.bfloat16),
    Case(T=6, H=6, K=2, D=32, S=64, lengths=(16, 0, 63), window=(0, 9), mask="tree",
         num_splits=3),
    Case(T=64, H=6, K=2, D=32, S=96, lengths=(0, 70), dtype=jnp.bfloat16, mask="batched",
         block_k=32),
]


@pytest.mark.parametrize("case", _TRITON_CASES, ids=str)
def test_triton_kernel_matches_reference_and_xla(case):
  _check_kernel(case, "gpu", seed=_TRITON_CASES.index(case))


@pytest.mark.parametrize("case", _MOSAIC_CASES, ids=str)
def test_mosaic_kernel_matches_reference_and_xla(case):
  _check_kernel(case, "tpu", seed=100 + _MOSAIC_CASES.index(case))


@pytest.mark.parametrize("backend,T,G", [("gpu", 4, 4), ("tpu", 16, 8)])
def test_every_prefix_length_from_0_to_S(backend, T, G):
  """One row per length 0..S (S and most lengths not multiples of the block) under a
  window, with kv_limit below S: lengths past it read as kv_limit, as in a cache
  sliced there."""
  S, bk, limit = 40, 16, 37
  case = Case(T=T, H=G, K=1, D=32, S=S, lengths=tuple(range(S + 1)), window=(3, 10),
              block_k=bk, mask="causal" if T < 16 else "batched")
  args = _inputs(case, seed=200 + T)
  out = _tree_attention(*args, **_window_kwargs(case), block_k=bk, kv_limit=limit,
                        backend=backend)
  clipped = (*args[:5], jnp.minimum(args[5], limit), args[6])
  _assert_close(out, _reference(clipped, case), case.dtype)
  with jax.default_matmul_precision("float32"):
    _assert_close(out, ta.tree_attention_reference(*args, **_window_kwargs(case),
                                                   kv_limit=limit), case.dtype)


@pytest.mark.parametrize("T,window", [(1, None), (1, (2, 7)), (4, (2, 7)), (16, None),
                                      (64, (2, 7))])
def test_reference_matches_xla_attention(T, window):
  G = {1: 1, 4: 3, 16: 4, 64: 8}[T]
  case = Case(T=T, H=2 * G, K=2, D=32, S=45, lengths=(0, 9, 45), window=window,
              mask="batched" if T > 1 else "causal")
  args = _inputs(case, seed=T)
  _assert_close(_reference(args, case), _xla(args, case), jnp.float32)


@pytest.mark.parametrize("T,window", [(1, (2, 7)), (16, None), (64, (2, 7))])
def test_reference_matches_xla_in_bf16(T, window):
  """Same bf16 roundings (scaled q, probabilities before the value product)."""
  case = Case(T=T, H=4, K=1, D=32, S=45, lengths=(0, 9, 45), window=window,
              dtype=jnp.bfloat16, mask="batched" if T > 1 else "causal")
  args = _inputs(case, seed=T)
  _assert_close(_reference(args, case), _xla(args, case), jnp.bfloat16)


def test_reference_matches_xla_on_the_tree_mask():
  case = Case(T=6, H=4, K=1, D=32, S=30, lengths=(0, 30, 13), mask="tree")
  args = _inputs(case, seed=7)
  np.testing.assert_array_equal(args[-1][1], [True, True, False, False, False, False])
  np.testing.assert_array_equal(args[-1][4], [True, True, False, False, True, False])
  _assert_close(_reference(args, case), _xla(args, case), jnp.float32)


@pytest.mark.parametrize("backend,window", [("gpu", None), ("tpu", (5, 10))])
def test_kernel_never_uses_blocks_without_a_visible_key(backend, window):
  """NaN in every block holding no visible position: skipped blocks cannot reach the
  output (0 * NaN would), so the output stays finite and equal to a clean cache's."""
  bk, S = 16, 120
  case = Case(T=4, H=4, K=2, D=32, S=S, lengths=(0, 23, 81, 120), window=window,
              block_k=bk)
  q, kn, vn, kc, vc, lengths, mask = _inputs(case, seed=11)
  pos = np.arange(S)
  poisoned_kc, poisoned_vc = np.array(kc), np.array(vc)
  for b, length in enumerate(case.lengths):
    visible = pos < length
    if window is not None:
      visible &= (pos < window[0]) | (pos >= length - window[1])
    used_blocks = np.zeros(_cdiv(S, bk), bool)
    used_blocks[pos[visible] // bk] = True
    unused = ~used_blocks[pos // bk]
    poisoned_kc[b, :, unused] = np.nan
    poisoned_vc[b, :, unused] = np.nan
  out = _tree_attention(q, kn, vn, jnp.asarray(poisoned_kc), jnp.asarray(poisoned_vc),
                        lengths, mask, **_window_kwargs(case), block_k=bk, backend=backend)
  _assert_close(out, _reference((q, kn, vn, kc, vc, lengths, mask), case), jnp.float32)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_queries_that_see_nothing_give_zeros(backend):
  case = Case(T=4, H=4, K=2, D=32, S=40, lengths=(0, 25))
  q, kn, vn, kc, vc, lengths, _ = _inputs(case, seed=3)
  mask = jnp.asarray(np.tril(np.ones((2, 4, 4), bool)))
  mask = mask.at[:, 2].set(False)  # Query 2 sees no new token; row 0 has no prefix.
  out = np.asarray(_tree_attention(q, kn, vn, kc, vc, lengths, mask, block_k=16,
                                   backend=backend))
  ref = np.asarray(_reference((q, kn, vn, kc, vc, lengths, mask), case))
  np.testing.assert_array_equal(out[0, 2], 0.0)
  np.testing.assert_array_equal(ref[0, 2], 0.0)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  assert np.abs(out[1, 2]).max() > 0  # Row 1 still sees its prefix.


@pytest.mark.parametrize("window", [None, (1, 20), (16, 16), (40, 0), (0, 33)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_tpu_schedule_reads_each_active_block_once(window, num_splits):
  """The Mosaic index map: computing steps cover the active blocks exactly once, and
  the block index never goes back, so idle steps repeat it and issue no DMA."""
  S, bk = 150, 16
  prefix = ta._Prefix(S, bk, window)  # pylint: disable=protected-access
  steps = _cdiv(prefix.max_active, num_splits)
  step_fn = jax.jit(functools.partial(ta._tpu_step, prefix,  # pylint: disable=protected-access
                                      num_splits))
  pos = np.arange(S)
  for length in (0, 1, 15, 16, 17, 40, 99, 149, 150):
    visible = pos < length
    if window is not None:
      visible &= (pos < window[0]) | (pos >= length - window[1])
    expected = sorted(set((pos[visible] // bk).tolist()))
    read, computed = [], []
    for split in range(num_splits):
      for step in range(steps):
        seg, c, computes = step_fn(0, split, step, jnp.asarray([length], jnp.int32))
        block = int(prefix.block(c, seg)[0]) // bk
        read.append(block)
        if computes:
          computed.append(block)
    # A block shared by the sinks and the recent run is computed twice (disjoint
    # positions) but read once.
    assert list(dict.fromkeys(computed)) == expected, (length, computed, expected)
    assert read == sorted(read), read
    dmas = 1 + sum(a != b for a, b in zip(read, read[1:]))
    assert dmas == max(len(expected), 1), (length, read, expected)


def test_kernels_lower_for_their_hardware():
  """Triton tiles must be powers of two and Mosaic blocks obey the TPU tiling rules;
  interpret mode checks neither, lowering (no device needed) checks both."""
  sd = jax.ShapeDtypeStruct
  B, T, H, K, D, S = 2, 6, 12, 4, 64, 1000
  args = (sd((B, T, H, D), jnp.bfloat16), sd((B, T, K, D), jnp.bfloat16),
          sd((B, T, K, D), jnp.bfloat16), sd((B, K, S, D), jnp.bfloat16),
          sd((B, K, S, D), jnp.bfloat16), sd((B,), jnp.int32), sd((T, T), jnp.bool_))
  for backend, platform, block_k in (("gpu", "cuda", 64), ("tpu", "tpu", 128)):
    for window in (None, (4, 100)):
      f = functools.partial(ta.tree_attention, block_k=block_k, backend=backend,
                            **({} if window is None else dict(sinks=window[0],
                                                              recent=window[1])))
      text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
      assert f"tree_attention_{'triton' if backend == 'gpu' else 'mosaic'}" in text



def test_float32_products_ask_for_float32_precision():
  """Triton multiplies float32 in TF32 (~1e-3 off) unless a product asks for HIGHEST: on
  an H200 eight float32 cases failed until every product in the kernel did. Interpret
  mode on CPU computes float32 either way, so the traced kernel is checked instead."""
  sd = jax.ShapeDtypeStruct
  B, T, H, K, D, S = 2, 6, 12, 4, 64, 256
  f32 = jnp.float32
  args = (sd((B, T, H, D), f32), sd((B, T, K, D), f32), sd((B, T, K, D), f32),
          sd((B, K, S, D), f32), sd((B, K, S, D), f32), sd((B,), jnp.int32),
          sd((T, T), jnp.bool_))
  for backend, block_k in (("gpu", 64), ("tpu", 128)):
    f = functools.partial(ta.tree_attention, block_k=block_k, backend=backend)
    # Each product's parameters (printed over several lines) name its precision.
    products = str(jax.make_jaxpr(f)(*args)).split("dot_general[")[1:]
    assert products, backend
    precisions = [p[:300].partition("precision=")[2].split("\n", 1)[0] for p in products]
    assert precisions == ["(Precision.HIGHEST, Precision.HIGHEST)"] * len(products), backend

def test_bad_arguments_raise():
  case = Case(T=1, H=4, K=2, D=32, S=40, lengths=(3,))
  args = _inputs(case, seed=0)
  with pytest.raises(ValueError, match="window must keep"):
    ta.tree_attention(*args, sinks=0, recent=0, backend="gpu", interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    ta.tree_attention(*args, block_k=24, backend="gpu", interpret=True)
  with pytest.raises(ValueError, match="multiple of 8"):
    ta.tree_attention(*args, block_k=12, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match="backend="):
    ta.tree_attention(*args, backend="cuda", interpret=True)
  with pytest.raises(ValueError, match="grouped"):
    ta.tree_attention_reference(args[0][:, :, :3], *args[1:])
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="interpret=True"):
      ta.tree_attention(*args)
