"""ssd_jax: exact speculative speculative decoding (SSD / Saguaro), SD and AR in JAX.

    from ssd_jax import LLM, SamplingParams
    llm = LLM(method="ssd")                      # embedded SmolLM2-135M + its draft
    out = llm.generate(["Write a prime test in Python."], SamplingParams(max_new_tokens=64),
                       chat_template=True)
"""

from ssd_jax.llm import LLM, RequestOutput
from ssd_jax.engine.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
