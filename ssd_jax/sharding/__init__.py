"""Meshes and the logical-axis rules that place parameters and KV pages on them."""

from ssd_jax.sharding.mesh import MeshError, MeshSpec, check_model_fits, make_meshes
from ssd_jax.sharding.rules import LOGICAL_RULES, param_shardings, sharding_for, spec_for

__all__ = ["MeshError", "MeshSpec", "check_model_fits", "make_meshes", "LOGICAL_RULES",
           "param_shardings", "sharding_for", "spec_for"]
