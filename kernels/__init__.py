"""dlmcache's shared layer (`dlmcache.kernels`): Triton ops with torch references, and KV compression
policies used by both the diffusion-LM caches and the VLM/AR side.

The repository keeps this folder at the top level as `kernels/`, but it installs as `dlmcache.kernels`:
the bare name `kernels` belongs to Hugging Face's distribution (used by transformers).
"""

if __name__ == "kernels":
    # Imported by its bare name: this checkout's folder, found because the checkout's root is on
    # sys.path (the working directory of `python -m pytest` or a REPL). That name is Hugging Face's
    # package, which transformers imports (and, from 5.25, requires): hand over to it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is None:
        raise ImportError(
            "'kernels' is Hugging Face's package, which is not installed; this checkout's kernels/ folder "
            "is dlmcache's, imported as dlmcache.kernels"
        )
    _theirs = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _theirs  # the import statement returns what sys.modules holds after this
    _spec.loader.exec_module(_theirs)
else:
    from .ops import QuantizedTensor, attention, dequantize_kv, gather_kv, quantize_kv, quantized_attention

    __all__ = ["QuantizedTensor", "attention", "dequantize_kv", "gather_kv", "quantize_kv", "quantized_attention"]
