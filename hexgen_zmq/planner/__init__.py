"""The HexGen planner: from a cluster description, a model and a workload to a deployment file.

Pure Python (stdlib, PyYAML, rich): no torch. Modules, one idea each:
`constants` (every cost-model and search constant), `catalog` (GPU datasheets), `cluster` (the cluster file),
`model` (Llama shapes), `costmodel` (times and memory), `plan` (groups, pipelines, timing), `dp` (best
pipeline of a group), `exhaustive` (brute-force references), `simulate` (Poisson arrivals, broker dispatch),
`evaluate` (memoised fitness), `genetic` (the search), `baselines`, `planning` (search + placement),
`emit` (deployment file), `report`, `picture`, `cli`.
"""

from hexgen_zmq.planner.cluster import Cluster, ClusterError, load_cluster, parse_cluster
from hexgen_zmq.planner.costmodel import CostModel, Workload
from hexgen_zmq.planner.model import PRESETS, ModelSpec, load_model
from hexgen_zmq.planner.planning import PlanOutcome, make_plan

__all__ = [
    "Cluster",
    "ClusterError",
    "CostModel",
    "ModelSpec",
    "PRESETS",
    "PlanOutcome",
    "Workload",
    "load_cluster",
    "load_model",
    "make_plan",
    "parse_cluster",
]
