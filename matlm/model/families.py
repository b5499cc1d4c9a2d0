"""The model-family registry: which config class builds which model.

A family is a config class (a `BodyConfig` subclass with the family's own fields), a
Flax model class built from it, and how to make example inputs for its `init`. Code that
only needs "the model of this config" (the train step, the trainer, `matlm info`,
`matlm compile`, gin registration, run_config.json) asks here instead of constructing
`MatLM`, so adding a family touches its own files and one `register_family` call
(docs/model_families.md).

run_config.json names the family (`"family": "lm"`); a model dict without it is the LM's,
as every run written before families existed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from matlm.model.config import BodyConfig, ModelConfig, ModelConfigError

DEFAULT_FAMILY = "lm"  # The family of a run_config.json model dict without "family".


@dataclasses.dataclass(frozen=True)
class Family:
    """One registered family.

    `example_inputs(config, seq_len)`: the positional arguments of a forward pass that
    `init` traces (shapes only matter). `tokens`: whether the model reads token ids of a
    vocabulary (`config.vocab_size`): the trainer then checks the data's vocabulary
    against it, and text evaluation (generation, scoring) applies.
    """

    name: str
    config_class: type
    model_class: Callable[[Any], nn.Module]
    example_inputs: Callable[[Any, int], tuple]
    tokens: bool = True
    description: str = ""


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, config_class: type, model_class: Callable[[Any], nn.Module],
                    example_inputs: Callable[[Any, int], tuple], *, tokens: bool = True,
                    description: str = "") -> Family:
    """Registers a family under `name` (one name per config class)."""
    if not (isinstance(config_class, type) and issubclass(config_class, BodyConfig)):
        raise TypeError(f"a family's config class must subclass BodyConfig, got {config_class!r}")
    for other in _FAMILIES.values():
        if other.name != name and other.config_class is config_class:
            raise ValueError(f"{config_class.__name__} is already family {other.name!r}")
    family = Family(name, config_class, model_class, example_inputs, tokens, description)
    _FAMILIES[name] = family
    return family


def families() -> tuple[Family, ...]:
    return tuple(_FAMILIES.values())


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ModelConfigError(f"unknown model family {name!r}; registered: "
                               f"{', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_of(config) -> Family:
    """The family whose config class `config` is (the most derived registered class in its
    type's MRO, so gin's wrapping subclass finds its family too)."""
    by_class = {f.config_class: f for f in _FAMILIES.values()}
    for cls in type(config).__mro__:
        if cls in by_class:
            return by_class[cls]
    raise ModelConfigError(f"{type(config).__name__} is no registered family's config; "
                           f"registered: {', '.join(sorted(_FAMILIES))}")


def build_model(config) -> nn.Module:
    """The Flax model of `config`'s family."""
    return family_of(config).model_class(config)


def _init(config, rng, seq_len: int):
    family = family_of(config)
    return family.model_class(config).init(rng, *family.example_inputs(config, seq_len))


def init_params(config, rng: jax.Array, seq_len: int = 8):
    """Real (unboxed) parameters of `config`'s model."""
    return nn.meta.unbox(_init(config, rng, seq_len)["params"])


def abstract_params(config, seq_len: int = 8):
    """Parameter shapes with their logical partitioning metadata, without allocating."""
    return jax.eval_shape(lambda r: _init(config, r, seq_len), jax.random.key(0))["params"]


def logical_axes(config):
    """A pytree of logical axis-name tuples, one per parameter."""
    return nn.get_partition_spec(abstract_params(config))


# ---- run_config.json --------------------------------------------------------------------

def config_to_dict(config) -> dict:
    """The model section of run_config.json: the config's fields and its family's name."""
    return {"family": family_of(config).name, **dataclasses.asdict(config)}


def config_from_dict(d: Mapping) -> tuple[Any, list[str]]:
    """(config, unknown field names) from a model section: the family named by "family"
    (absent: "lm"), its known fields (missing ones take their defaults); fields this
    version does not know are left out and listed, so newer runs still load."""
    d = dict(d)
    family = get_family(d.pop("family", DEFAULT_FAMILY))
    known = {f.name for f in dataclasses.fields(family.config_class)}
    unknown = sorted(k for k in d if k not in known)
    return family.config_class(**{k: v for k, v in d.items() if k in known}), unknown


# ---- the built-in families: the LM (MatLM) ----------------------------------------------

def _lm_inputs(config: ModelConfig, seq_len: int) -> tuple:
    return (jnp.zeros((1, seq_len), jnp.int32),)  # Token ids, [B, T].


# ---- the ViT (MatViT) ---------------------------------------------------------------------

def _vit_inputs(config, seq_len: int) -> tuple:
    del seq_len  # An image's token count is the config's (ViTConfig.num_tokens).
    return (jnp.zeros((1, *config.image_shape), jnp.float32),)  # Images, [B, H, W, C].


def _register_builtin() -> None:
    from matlm.model.transformer import MatLM
    from matlm.model.vit import MatViT
    from matlm.model.vit_config import ViTConfig
    register_family(DEFAULT_FAMILY, ModelConfig, MatLM, _lm_inputs, tokens=True,
                    description="decoder-only causal LM (MatLM): tokens -> next-token logits")
    register_family("vit", ViTConfig, MatViT, _vit_inputs, tokens=False,
                    description="bidirectional image encoder (MatViT): images -> class logits")


_register_builtin()
