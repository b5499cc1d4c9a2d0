"""Remote code saved next to a Mix'n'Match export: Llama with one FFN width per layer.

`matlm export --format=hf` copies this file into the export dir as `modeling_matlm.py`
and names it in config.json's `auto_map`, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

builds `MatLMForCausalLM`. It is `LlamaForCausalLM` unchanged except that layer i's MLP
has `layer_intermediate_sizes[i]` hidden units (its own width: the weights, FLOPs and
KV cache are those of the submodel, nothing is padded). Everything else — attention,
RoPE, RMSNorm, tied embeddings, generation, caching — is transformers' own Llama code.

Only absolute `transformers` imports: the file runs from the Hugging Face module cache,
outside matlm (and without matlm installed).
"""
from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP


@strict
class MatLMConfig(LlamaConfig):
    """LlamaConfig plus `layer_intermediate_sizes` (one FFN width per layer);
    `intermediate_size` holds the widest, for tools that read one number."""

    model_type = "matlm_llama"
    layer_intermediate_sizes: list[int] | None = None

    def validate_architecture(self):
        super().validate_architecture()
        sizes = self.layer_intermediate_sizes
        if sizes is None or len(sizes) != self.num_hidden_layers or min(sizes) < 1:
            raise ValueError(f"layer_intermediate_sizes must list one positive width per "
                             f"layer ({self.num_hidden_layers}), got {sizes}")


class MatLMForCausalLM(LlamaForCausalLM):
    config_class = MatLMConfig

    def __init__(self, config: MatLMConfig):
        super().__init__(config)
        # Llama builds every MLP at `intermediate_size` (the widest); replace each with
        # one at its own width. Under from_pretrained this runs on the meta device, so
        # the discarded wide MLPs cost no memory; the weights are then loaded into these.
        for layer, width in zip(self.model.layers, config.layer_intermediate_sizes,
                                strict=True):
            narrow = copy.copy(config)
            narrow.intermediate_size = int(width)
            layer.mlp = LlamaMLP(narrow)
        self.post_init()


__all__ = ["MatLMConfig", "MatLMForCausalLM"]
