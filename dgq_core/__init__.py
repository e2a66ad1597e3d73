"""DGQ: Distribution-aware Group Quantization for text-to-image diffusion UNets."""

import os

# Integer execution runs one oneDNN GEMM per channel group, and every group slice has its own shape: a UNet call
# needs thousands of distinct primitives, and with oneDNN's default cache of 1,024 they are JIT-compiled again on
# every call (1.7 s of a 5.6 s SD v1.5 UNet call, BENCHMARKS.md). oneDNN reads this once, at its first primitive, so
# it is set on import, before any model runs; a value set by the user wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

__version__ = "0.1.0"
