"""Benchmarks of ssd_jax: the harness (AR / SD / SSD over prompt sets), the roofline, plots,
the PyTorch peer, and probes/ of single programs and kernels.

Benchmarks import the library; nothing in ssd_jax imports them. Run the tools from the
repository root with it on the path: `PYTHONPATH=$PWD python bench/harness.py --help`.
"""
