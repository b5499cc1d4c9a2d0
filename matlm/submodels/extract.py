"""Extract one submodel of a MatFormer checkpoint as a standalone, smaller matlm model.

`extract_submodel(params, config, widths) -> (params, config)` cuts every layer's FFN
kernels to its width and returns the config of the dense model those kernels form;
`write_extracted` writes it as a model dir that `matlm eval`, `matlm info --checkpoint_dir`
and `matlm train` read like any other.

The extracted layout. Shard-local nest blocks are undone first
(`matlm.model.layout.ffn_to_contiguous`): a layer's first m units in nesting order are
then its first m stored units, so the kernels are plain prefixes and
`ffn_nest_blocks = 1`. Layers are unrolled for a per-layer (Mix'n'Match) vector and keep
the parent's layer form for a uniform one.

The extracted config.
- Uniform widths: a plain model with `d_ff = m` (no `layer_d_ff`): it is an ordinary
  MatLM that any tool (scanned layers, `matlm export` as a Llama `intermediate_size`)
  takes without a special case.
- Per-layer widths: `layer_d_ff = widths`, `d_ff = max(widths)`.
- Granularities: the parent's granularities narrower than `d_ff`, then `d_ff` itself
  under the parent's name for that width (or its number, e.g. "96"). They stay nested
  prefixes of the parent's, so the extracted model's S is the parent's S; in a
  per-layer model a named granularity uses min(width, layer width) per layer
  (`GranularitySpec.layer_caps`), and its largest one is the whole extracted model.
- `width_alignment` and everything outside the FFN are the parent's.

On disk: a params-only checkpoint (`save_for_inference`: params + checksums, no optimizer
state or data state) at step 0, so the dir's size follows its parameter count and
`load_checkpoint_for_inference` reads it; `run_config.json` (model + the parent's data
config), the parent's `vocab.model`, `extracted_from.json` (provenance) and `model.gin`
(the ModelConfig bindings, for `matlm train --gin_file=RUN.gin --gin_file=OUT/model.gin
--model_dir=OUT` to fine-tune it).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from matlm.model.config import ModelConfig
from matlm.model.layout import ffn_to_contiguous, stack_layers, unstack_layers
from matlm.model.reference import slice_params

EXTRACTED_STEP = 0  # The step the params-only checkpoint is saved at: fine-tuning starts here.
PROVENANCE_FILE = "extracted_from.json"
GIN_FILE = "model.gin"
# Fields `matlm train` may change between jobs (model_dir.EXECUTION_ONLY_FIELDS): left to
# the run's own gin rather than pinned by model.gin.
_UNPINNED = frozenset({"remat_policy", "attention_impl", "attention_query_block"})


class ExtractError(ValueError):
    """Widths, checkpoint or output dir that cannot be extracted (one line, no writes)."""


def resolve_extract_widths(config: ModelConfig, widths,
                           extracted_from: Optional[dict] = None) -> tuple[int, ...]:
    """The per-layer width vector for `widths` (a name, an integer, or one entry per
    layer), refusing anything wider than what the checkpoint stores. `extracted_from`:
    the checkpoint's own provenance when it is itself an extracted model (for the error)."""
    try:
        return config.resolve_widths(widths)
    except ValueError as e:
        known = ", ".join(f"{n}={w}" for n, w in config.granularities.by_name.items())
        extracted = ""
        if extracted_from is not None or config.layer_d_ff:
            extracted = (" This checkpoint is itself an extracted submodel (FFN widths "
                         f"{_text(config.ffn_dims)}): it can only be cut narrower.")
        raise ExtractError(f"--widths={_text(widths)!r} is invalid for this checkpoint: {e} "
                           f"(granularities {known}).{extracted}") from None


def _text(widths) -> str:
    if isinstance(widths, (list, tuple)):
        return ",".join(map(str, widths))
    return str(widths)


def extracted_config(config: ModelConfig, widths: tuple[int, ...]) -> ModelConfig:
    """The config of the dense model formed by `config`'s first `widths[i]` FFN units."""
    top = max(widths)
    spec = config.granularities
    names = [n for n, w in spec.by_name.items() if w < top]
    inverse = {w: n for n, w in spec.by_name.items()}
    top_name = inverse.get(top, str(top))
    if top_name in names:  # A granularity literally named like the number; keep unique.
        top_name = f"w{top}"
    uniform = len(set(widths)) == 1
    return dataclasses.replace(
        config, d_ff=top, layer_d_ff=() if uniform else tuple(widths),
        granularity_names=(*names, top_name),
        granularity_widths=(*(spec.by_name[n] for n in names), top),
        ffn_nest_blocks=1,
        # Stacked layers need equal shapes (ModelConfig refuses scan with layer_d_ff).
        scan_layers=config.scan_layers and uniform)


def extract_submodel(params, config: ModelConfig, widths) -> tuple[dict, ModelConfig]:
    """(params, config) of the standalone submodel of `params` at `widths` (anything
    `ModelConfig.resolve_widths` takes: "M", 64, "S,XL,M,L", (32, 64, ...)).

    Its logits at its full width equal the parent's at `widths` (the sliced path). The
    arrays come back as host numpy float32 (what they were stored as).
    """
    widths = resolve_extract_widths(config, widths)
    new_config = extracted_config(config, widths)
    contiguous = ffn_to_contiguous(unstack_layers(params), config.ffn_nest_blocks)
    sliced = jax.tree.map(np.asarray, slice_params(contiguous, widths))
    if new_config.scan_layers:
        sliced = jax.tree.map(np.asarray, stack_layers(sliced))
    return sliced, new_config


# --- The model dir. --------------------------------------------------------------------------

def check_output_dir(output):
    """The output dir (a local path, or a gs:// URL checked for write access), refused
    (before anything is written) if it exists and is not empty."""
    from matlm.model_dir import storage
    path = storage.output_path(output)
    if not storage.is_url(path):
        path = path.absolute()
    if path.exists() and not path.is_dir():
        raise ExtractError(f"--output={output!r} exists and is not a directory; give a new "
                           "or empty directory")
    if path.is_dir() and any(path.iterdir()):
        raise ExtractError(f"--output={output!r} exists and is not empty; nothing was "
                           "written (give a new or empty directory)")
    return path


def model_gin(config: ModelConfig) -> str:
    """gin bindings of `config` (execution-only fields left to the run's gin), plus a dense
    fine-tuning objective: only the extracted model's own (largest) granularity."""
    cls = type(config)  # The family's config class (ModelConfig, ViTConfig, ...).
    lines = [f"# Written by `matlm extract`: this model's {cls.__name__}. Give it after the "
             "run's gin",
             "# files (later bindings win): matlm train --gin_file=RUN.gin "
             "--gin_file=THIS --model_dir=THIS_DIR"]
    for field in dataclasses.fields(cls):
        if field.name not in _UNPINNED:
            lines.append(f"{cls.__name__}.{field.name} = {getattr(config, field.name)!r}")
    top = config.granularity_names[-1]
    lines += ["# Fine-tune as a dense model: train the whole extracted model only (set",
              "# TrainConfig.granularities to all names to keep training its nested ones).",
              f"TrainConfig.granularities = ({top!r},)",
              "TrainConfig.granularity_mode = 'all'",
              "TrainConfig.granularity_weights = ()", ""]
    return "\n".join(lines)


def write_extracted(output, params, config: ModelConfig, vocab_path: str = "",
                    data_config: Optional[dict] = None,
                    provenance: Optional[dict] = None) -> Path:
    """Writes the extracted model dir (module docstring). The caller checks `output`
    first (`check_output_dir`)."""
    from matlm.model_dir import save_for_inference
    path = check_output_dir(output)
    save_for_inference(path, config, params, EXTRACTED_STEP, vocab_path, data_config or {})
    (path / GIN_FILE).write_text(model_gin(config))
    (path / PROVENANCE_FILE).write_text(json.dumps(provenance or {}, indent=2) + "\n")
    return path
