"""latent-sft: the shared library every pipeline stage calls."""

__version__ = "0.1.0"
