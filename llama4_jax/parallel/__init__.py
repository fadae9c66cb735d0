"""Parallelism: the logical-axis rules table, meshes, jax.distributed start-up, host runtime.

The model imports only `rules` (logical names → shardings); the runner builds meshes here.
"""

from .mesh import (MUST_DIVIDE, abstract_mesh, batch_divisor, batch_sharding, batch_shardings, check_batch_layout,
                   check_fit, context_shards, for_rank, format_bytes, to_context_layout, global_batch, make_mesh, model_dims, per_device_bytes, total_bytes)
from .rules import (DEFAULT_RULES, MESH_AXES, constrain, current_rules, logical_rules, merged_rules, rule_axes,
                    set_rules, spec_for, tree_shardings, zigzag_order)
from ..errors import MeshError

__all__ = ["DEFAULT_RULES", "MESH_AXES", "MUST_DIVIDE", "MeshError", "abstract_mesh", "batch_divisor",
           "batch_sharding", "batch_shardings", "check_batch_layout", "context_shards", "for_rank", "check_fit", "constrain", "current_rules", "format_bytes",
           "global_batch", "logical_rules", "make_mesh", "merged_rules", "model_dims", "per_device_bytes",
           "rule_axes", "set_rules", "spec_for", "to_context_layout", "total_bytes", "tree_shardings",
           "zigzag_order"]
