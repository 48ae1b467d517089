"""paretoq_jax: extremely low-bit quantization-aware training (ParetoQ) in JAX / Flax NNX."""

__version__ = "0.1.0"
