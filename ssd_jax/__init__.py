"""ssd_jax: exact speculative speculative decoding in JAX."""
