"""The model layer: the shared nested-Transformer body, the families on top of it (found
through matlm.model.families; the causal LM, MatLM, is "lm"), exact counts, a dense oracle."""
from matlm.model.config import BodyConfig, ModelConfig, ModelConfigError
from matlm.model.counting import forward_flops_per_token, param_count
from matlm.model.families import (abstract_params, build_model, family_of, init_params,
                                  logical_axes)
from matlm.model.granularity import GranularityError, GranularitySpec
from matlm.model.transformer import MatLM

__all__ = [
    "BodyConfig", "GranularityError", "GranularitySpec", "MatLM", "ModelConfig",
    "ModelConfigError", "abstract_params", "build_model", "family_of", "forward_flops_per_token",
    "init_params", "logical_axes", "param_count",
]
