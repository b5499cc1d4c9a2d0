"""Remote code saved next to a Mix'n'Match export: Llama with one FFN width per layer.

`matlm export --format=hf` copies this file into the export dir as `modeling_matlm.py`
and names it in config.json's `auto_map`, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

builds `MatLMForCausalLM`. It is `LlamaForCausalLM` unchanged except that layer i's MLP
has `layer_intermediate_sizes[i]` hidden units (its own width: the weights, FLOPs and
KV cache are those of the submodel, nothing is padded). Everything else — attention,
RoPE, RMSNorm, tied embeddings, generation, caching — is transformers' own Llama code.

It loads in transformers 4.x and 5.x (docs/export.md): 5.x configs are `@strict`
dataclasses that declare their fields, 4.x configs are plain classes that take them in
`__init__` (and `@strict` refuses them: "must be a dataclass"), so the config is
written once for each. Only absolute imports of transformers and huggingface_hub: the
file runs from the Hugging Face module cache, outside matlm (and without matlm installed).
"""
from __future__ import annotations

import copy
import dataclasses

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

MODEL_TYPE = "matlm_llama"

if dataclasses.is_dataclass(LlamaConfig):  # transformers 5.x
    from huggingface_hub.dataclasses import strict

    @strict
    class MatLMConfig(LlamaConfig):
        """LlamaConfig plus `layer_intermediate_sizes` (one FFN width per layer);
        `intermediate_size` holds the widest, for tools that read one number."""

        model_type = MODEL_TYPE
        layer_intermediate_sizes: list[int] | None = None
else:  # transformers 4.x
    class MatLMConfig(LlamaConfig):
        """LlamaConfig plus `layer_intermediate_sizes` (one FFN width per layer);
        `intermediate_size` holds the widest, for tools that read one number."""

        model_type = MODEL_TYPE

        def __init__(self, layer_intermediate_sizes=None, **kwargs):
            self.layer_intermediate_sizes = layer_intermediate_sizes
            super().__init__(**kwargs)


def check_layer_sizes(config) -> list[int]:
    """One positive width per layer. Checked when the model is built, not in the config:
    transformers builds configs without arguments (defaults, diffs), where it is None."""
    sizes = config.layer_intermediate_sizes
    if (not isinstance(sizes, (list, tuple)) or len(sizes) != config.num_hidden_layers
            or min(sizes) < 1):
        raise ValueError(f"layer_intermediate_sizes must list one positive width per "
                         f"layer ({config.num_hidden_layers}), got {sizes}")
    return [int(w) for w in sizes]


class MatLMForCausalLM(LlamaForCausalLM):
    config_class = MatLMConfig

    def __init__(self, config: MatLMConfig):
        widths = check_layer_sizes(config)
        super().__init__(config)
        # Llama builds every MLP at `intermediate_size` (the widest); replace each with
        # one at its own width. Under from_pretrained this runs on the meta device, so
        # the discarded wide MLPs cost no memory; the weights are then loaded into these.
        for layer, width in zip(self.model.layers, widths, strict=True):
            narrow = copy.copy(config)
            narrow.intermediate_size = width
            layer.mlp = LlamaMLP(narrow)
        self.post_init()


__all__ = ["MatLMConfig", "MatLMForCausalLM"]
