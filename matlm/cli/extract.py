"""`matlm extract`: one submodel of a checkpoint as a standalone, smaller model dir.

    matlm extract --model_dir=runs/tiny --widths=M --output=runs/tiny_M
    matlm extract --model_dir=runs/tiny --widths=S,M,L,XL --output=runs/tiny_mix

Checks the checkpoint dir, the widths and the output dir before loading parameters or
writing anything; an output dir that exists and is not empty is refused, never
overwritten. See matlm.submodels.extract for the format and docs/submodels.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

FLAG_CHECKS = {"step": Check(int, ge=0)}

PARENTS = [flags.model_dir(), flags.step(),
           flags.output("the new model dir (must not exist, or be empty)", required=True)]


def add_arguments(parser) -> None:
    parser.add_argument("--widths", required=True,
                        help="the submodel: a granularity name (M), an integer, or one "
                             "name/integer per layer (S,M,L,XL,...)")


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    flags.refuse_gin_bindings("matlm extract", gin_bindings)
    from matlm.model.counting import param_count
    from matlm.submodels import extract as lib
    import matlm.model_dir as model_dir_lib
    from matlm.model_dir import storage

    start = time.time()
    # 1. Everything the user gave, before any parameter is read or anything written.
    model_dir, run_config = model_dir_lib.open_run(args.model_dir)
    config = run_config.model
    provenance_file = model_dir.path / lib.PROVENANCE_FILE
    parent_provenance = (json.loads(provenance_file.read_text())
                         if provenance_file.is_file() else None)
    widths = lib.resolve_extract_widths(config, args.widths, parent_provenance)
    step = model_dir.resolve_step(args.step)
    output = lib.check_output_dir(args.output)
    # 2. Load, cut, write.
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, step)
    params, new_config = lib.extract_submodel(loaded.params, config, widths)
    provenance = {"checkpoint_dir": str(model_dir.path), "step": loaded.step,
                  "widths": list(widths), "parent_d_ff": config.d_ff,
                  "parent_layer_d_ff": list(config.layer_d_ff),
                  "parent_ffn_nest_blocks": config.ffn_nest_blocks,
                  "parent_extracted_from": parent_provenance}
    # The parent's data section as saved: typing it would import TensorFlow for nothing.
    lib.write_extracted(output, params, new_config, loaded.vocab_path, loaded.data_config,
                        provenance)
    # 3. Sizes: parameters (exact counts) and bytes on disk of each checkpoint.
    parent_params, new_params = param_count(config), param_count(new_config)
    parent_bytes = storage.tree_bytes(model_dir.checkpoints / str(loaded.step))
    parent_param_bytes = storage.tree_bytes(model_dir.checkpoints / str(loaded.step) / "params")
    new_bytes = storage.tree_bytes(output / "checkpoints" / str(lib.EXTRACTED_STEP))
    print(f"extracted widths {','.join(map(str, widths))} of {model_dir.path} "
          f"(step {loaded.step}) to {output}")
    print(f"  parameters: {parent_params:,} -> {new_params:,} "
          f"({new_params / parent_params:.3f})")
    print(f"  checkpoint on disk: {_human_bytes(parent_bytes)} "
          f"(params {_human_bytes(parent_param_bytes)}) -> {_human_bytes(new_bytes)} "
          f"(params only; {new_bytes / parent_param_bytes:.3f} of the parent's params)")
    print(f"  model: d_ff={new_config.d_ff}"
          + (f", layer_d_ff={','.join(map(str, new_config.layer_d_ff))}"
             if new_config.layer_d_ff else "")
          + f", granularities {', '.join(f'{n}={w}' for n, w in zip(new_config.granularity_names, new_config.granularity_widths))}"
          f" ({time.time() - start:.1f}s)")
    return 0
