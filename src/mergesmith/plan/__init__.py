"""The plan: one job per output tensor, complete before any weight is read.

Every check that names, shapes, dtypes and parameters allow is made here, and all problems are
reported together: `method_checks` (the recipe against its method), `layers` (which layers each
group merges), `params` (each parameter's value per tensor and model), `build` (the jobs).
"""

from mergesmith.plan.build import build_plan
from mergesmith.plan.jobs import Plan, TensorInput, TensorJob, derive_seed

__all__ = ["Plan", "TensorInput", "TensorJob", "build_plan", "derive_seed"]
