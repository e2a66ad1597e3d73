"""DGQ: Distribution-aware Group Quantization for text-to-image diffusion UNets."""

__version__ = "0.1.0"
