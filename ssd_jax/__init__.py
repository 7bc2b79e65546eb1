"""ssd_jax: exact speculative speculative decoding (SSD / Saguaro), SD and AR in JAX.

    from ssd_jax import LLM, SamplingParams
    llm = LLM(method="ssd")                      # embedded SmolLM2-135M + its draft
    out = llm.generate(["Write a prime test in Python."], SamplingParams(max_new_tokens=64),
                       chat_template=True)
"""

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name):
  # Imported on first use, so that `python -m ssd_jax.launch` can check its flags, and
  # handle Ctrl-C, before JAX is imported (seconds).
  if name in ("LLM", "RequestOutput"):
    from ssd_jax import llm
    return getattr(llm, name)
  if name == "SamplingParams":
    from ssd_jax.engine.sampling import SamplingParams
    return SamplingParams
  raise AttributeError(f"module 'ssd_jax' has no attribute {name!r}")
