"""`matlm export --format=hf`: one submodel of a checkpoint as a Hugging Face model dir.

    matlm export --model_dir=runs/tiny --widths=M --format=hf --output=runs/tiny_M_hf
    matlm export --model_dir=runs/tiny --widths=S,M,L,XL --format=hf --output=runs/mix_hf
    matlm export --model_dir=runs/tiny_M --format=hf --output=runs/tiny_M_hf  # an extracted dir

Uniform widths load as plain `LlamaForCausalLM`; per-layer widths as `MatLMForCausalLM`
(remote code saved with the export: `trust_remote_code=True`). Everything the user gave —
format, checkpoint dir, step, activation, widths, output dir, the export extra — is
checked before parameters are read or anything is written. See matlm.export.hf and
docs/export.md.
"""
from __future__ import annotations

import json
import time

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

FLAG_CHECKS = {"step": Check(int, ge=0)}
FORMATS = ("hf",)

PARENTS = [flags.model_dir(), flags.step(),
           flags.output("the export dir (must not exist, or be empty)", required=True)]


def add_arguments(parser) -> None:
    parser.add_argument("--widths", default=None,
                        help="the submodel: a granularity name (M), an integer, or one "
                             "name/integer per layer (S,M,L,XL,...); default: the stored "
                             "widths (the whole model)")
    parser.add_argument("--format", default="hf",
                        help="export format: hf (a Hugging Face model dir; the only one)")


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    flags.refuse_gin_bindings("matlm export", gin_bindings)
    if args.format not in FORMATS:
        raise ValueError(f"--format={args.format!r} is not supported; expected one of: "
                         f"{', '.join(FORMATS)}")
    from matlm.export import hf
    from matlm.model.counting import param_count
    from matlm.submodels import extract
    import matlm.model_dir as model_dir_lib
    from matlm.model_dir import storage

    start = time.time()
    # 1. Everything the user gave, before any parameter is read or anything written.
    model_dir, run_config = model_dir_lib.open_run(args.model_dir)
    config = run_config.model
    hf.check_exportable(config)
    widths = (config.ffn_dims if args.widths is None
              else extract.resolve_extract_widths(config, args.widths))
    step = model_dir.resolve_step(args.step)
    output = extract.check_output_dir(args.output)
    if not model_dir.vocab_file.is_file():
        raise hf.ExportError(f"--model_dir={args.model_dir!r} has no vocab.model "
                             "to export as the tokenizer")
    hf.require_backend()
    # 2. Load, cut, write.
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, step)
    provenance = {"checkpoint_dir": str(model_dir.path), "step": loaded.step,
                  "widths": list(widths), "parent_ffn_dims": list(config.ffn_dims),
                  "parent_ffn_nest_blocks": config.ffn_nest_blocks}
    with storage.staged_dir(output) as local:  # On a bucket: written here, then uploaded.
        done = hf.export_hf(loaded.params, config, widths, loaded.vocab_path, local,
                            max_positions=run_config.seq_len, provenance=provenance)
    parent, exported = param_count(config), param_count(done.config)
    kind = ("MatLMForCausalLM (per-layer widths; load with trust_remote_code=True)"
            if done.remote_code else "LlamaForCausalLM")
    print(f"exported widths {','.join(map(str, done.widths))} of {model_dir.path} "
          f"(step {loaded.step}) to {output} as {kind}")
    print(f"  parameters: {parent:,} -> {exported:,} ({exported / parent:.3f}); "
          f"{done.bytes / 1e6:.2f} MB on disk ({time.time() - start:.1f}s)")
    # The tokenizer too: without the flag, AutoTokenizer reads config.json's auto_map and
    # asks interactively whether to run the remote code.
    remote = ", trust_remote_code=True" if done.remote_code else ""
    path = json.dumps(str(output))
    print(f"  load: AutoModelForCausalLM.from_pretrained({path}{remote}), "
          f"AutoTokenizer.from_pretrained({path}{remote})")
    return 0
