"""Pallas kernels of specjax, one per module, each next to its plain-jnp ``*_reference``.

``tree_attention``: prefix + new-token attention (decode, chain/tree verify, windowed
drafts) for GPU (Triton) and TPU (Mosaic); see that module for what it covers.

This package imports nothing else of ours: the model chooses between a kernel and the
XLA path, never the other way round. Import the modules themselves
(``from pallas_kernels import tree_attention``), not names re-exported here.
"""
