"""Serving: the engine thread (engine.py), the OpenAI-compatible HTTP API (app.py,
`python -m ssd_jax.serve`) and the terminal chat (`python -m ssd_jax.chat`)."""
