"""The MatLM model: config, granularities, Flax modules, exact counts, a dense oracle."""
from matlm.model.config import ModelConfig, ModelConfigError
from matlm.model.counting import forward_flops_per_token, param_count
from matlm.model.granularity import GranularityError, GranularitySpec
from matlm.model.transformer import MatLM, abstract_params, init_params, logical_axes

__all__ = [
    "GranularityError", "GranularitySpec", "MatLM", "ModelConfig", "ModelConfigError",
    "abstract_params", "forward_flops_per_token", "init_params", "logical_axes", "param_count",
]
