"""pyramidion-tune's engine: per-GPU memory of a training configuration and the choice of one that fits.

memory.py    parameter counts, model states (DeepSpeed's estimators), analytic activations
plan.py      candidates (stage × offload × checkpointing × micro-batch), relative time, outputs
measure.py   one real forward+backward: peak activation bytes (CPU profiler events / CUDA stats)
trials.py    checks of the chosen configuration: its written JSON, one real step, a few real updates
calibrate.py estimate-vs-measured table for the docs
"""

from .memory import ActivationEstimate, ModelStates, ParamCount, activation_bytes, count_parameters, model_states
from .plan import Candidate, Cluster, Plan, make_plan

__all__ = [
    "ActivationEstimate",
    "Candidate",
    "Cluster",
    "ModelStates",
    "ParamCount",
    "Plan",
    "activation_bytes",
    "count_parameters",
    "make_plan",
    "model_states",
]
