"""`matlm info`: model dimensions and a per-submodel table of parameters and FLOPs.

Works from abstract shapes only, so a 2.6B config prints in seconds on a laptop.
"""
from __future__ import annotations

import argparse

import jax
from tabulate import tabulate

from matlm.cli import flags
from matlm.gin_config import model_config_from_gin, parse_gin
from matlm.model import ModelConfig, abstract_params, family_of
from matlm.model.counting import (forward_flops_per_image, forward_flops_per_token,
                                  joint_forward_flops_per_image,
                                  joint_forward_flops_per_token, param_count)
from matlm.model.vit_config import ViTConfig


PARENTS = [
    flags.gin_files("gin file(s) describing the model (repeatable); default "
                    "configs/models/tiny.gin"),
    flags.model_dir(required=False,
                    help="read the model from this model dir's run_config.json (e.g. one "
                         "written by `matlm extract`) instead of gin files")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", action="append", default=[],
                        help="a Mix'n'Match width vector to add to the table: a granularity "
                             "name, an integer, or one comma-separated name/integer per layer "
                             "(repeatable)")
    parser.add_argument("--seq_len", type=int, default=2048,
                        help="sequence length for attention FLOPs (default 2048; a ViT's "
                             "is its image's token count)")


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def forward_flops(config, seq_len: int, widths=None) -> float:
    """Forward FLOPs in the family's unit: per token at `seq_len` (the LM), per image (a
    ViT, whose sequence is its patches)."""
    if isinstance(config, ViTConfig):
        return forward_flops_per_image(config, widths)
    return forward_flops_per_token(config, seq_len, widths)


def joint_forward_flops(config, seq_len: int, vectors) -> float:
    if isinstance(config, ViTConfig):
        return joint_forward_flops_per_image(config, vectors)
    return joint_forward_flops_per_token(config, seq_len, vectors)


def flops_unit(config, seq_len: int) -> str:
    return "image" if isinstance(config, ViTConfig) else f"token (T={seq_len})"


def family_rows(config) -> list:
    """The dimensions only the config's family has (what goes in and what comes out)."""
    if isinstance(config, ViTConfig):
        return [["image (H × W × C) / patch", f"{' × '.join(map(str, config.image_shape))} / "
                 f"{config.patch_size}"],
                ["tokens", f"{config.num_tokens} ({config.num_patches} patches"
                 f"{' + class token' if config.pooling == 'cls' else ''})"],
                ["num_classes / pooling", f"{config.num_classes} / {config.pooling}"]]
    return [["vocab_size", config.vocab_size]]


def submodel_rows(config: ModelConfig, width_vectors, seq_len: int):
    """(label, widths) rows: every named granularity, then the given width vectors."""
    spec = config.granularities
    entries = [(name, spec.uniform(name)) for name in spec.names]
    entries += [(f"mix{k}" if len(set(w)) > 1 else spec.name_of(w), w)
                for k, w in enumerate(width_vectors, 1)]
    full = param_count(config)
    full_flops = forward_flops(config, seq_len)
    rows = []
    for label, widths in entries:
        params = param_count(config, widths)
        flops = forward_flops(config, seq_len, widths)
        width_text = str(widths[0]) if len(set(widths)) == 1 else spec.name_of(widths)
        if len(width_text) > 40:  # The full vector is printed under the table.
            width_text = width_text[:39] + "…"
        rows.append([label, width_text, f"{params:,}", _human(params),
                     f"{params / full:.3f}", _human(flops), f"{flops / full_flops:.3f}"])
    return rows


def run(args, gin_bindings) -> int:
    if args.model_dir is not None:
        if args.gin_file or gin_bindings:
            raise ValueError("--model_dir reads the model from the dir's run_config.json; "
                             "give it or --gin_file/--gin.* bindings, not both")
        from matlm.model_dir import ModelDir
        config = ModelDir(args.model_dir).model_config()
    else:
        parse_gin(args.gin_file or ["configs/models/tiny.gin"], gin_bindings)
        config = model_config_from_gin()
    width_vectors = [config.resolve_widths(w) for w in args.widths]  # Validate first.
    if args.seq_len < 1:
        raise ValueError(f"--seq_len must be positive, got {args.seq_len}")
    # Build abstractly: proves the config constructs and that counts match the tree.
    shapes = abstract_params(config)
    tree_params = sum(x.size for x in jax.tree.leaves(shapes))
    assert tree_params == param_count(config), (tree_params, param_count(config))

    dims = [
        ["family", family_of(config).name],  # matlm.model.families
        *family_rows(config), ["d_model", config.d_model],
        ["n_layers", config.n_layers], ["n_heads / kv_heads / head_dim",
                                        f"{config.n_heads} / {config.num_kv_heads} / {config.head_size}"],
        ["d_ff", config.d_ff if not config.layer_d_ff else
         f"{config.d_ff} (stored per layer: {','.join(map(str, config.layer_d_ff))})"],
        ["activation", config.activation],
        *([] if isinstance(config, ViTConfig) else [["tie_embeddings", config.tie_embeddings]]),
        ["position_encoding", config.position_encoding], ["compute_dtype", config.compute_dtype],
        ["granularities", ", ".join(f"{n}={w}" for n, w in config.granularities.by_name.items())],
        ["parameters (tree)", f"{tree_params:,}"],
    ]
    print(tabulate(dims, tablefmt="simple_outline"))
    print()
    headers = ["submodel", "FFN width per layer", "params", "≈", "params / full",
               f"fwd FLOPs/{flops_unit(config, args.seq_len)}", "FLOPs / full"]
    print(tabulate(submodel_rows(config, width_vectors, args.seq_len), headers=headers,
                   tablefmt="simple_outline", disable_numparse=True))
    for k, widths in enumerate(width_vectors, 1):
        if len(set(widths)) > 1:
            print(f"mix{k} widths: {','.join(map(str, widths))}")
    print(joint_step_line(config, args.seq_len))
    return 0


def joint_step_line(config: ModelConfig, seq_len: int) -> str:
    """FLOPs of the joint pass that trains every granularity (granularity_mode='all'),
    which shares residual streams, against the granularities run one by one."""
    spec = config.granularities
    vectors = [spec.uniform(name) for name in spec.names]
    joint = joint_forward_flops(config, seq_len, vectors)
    separate = sum(forward_flops(config, seq_len, w) for w in vectors)
    unit = "image" if isinstance(config, ViTConfig) else "token"
    return (f"joint pass over {', '.join(spec.names)} (training with every granularity, "
            f"shared residual streams): {_human(joint)} fwd FLOPs/{unit} = "
            f"{joint / forward_flops(config, seq_len):.3f} × full, "
            f"{joint / separate:.3f} of the granularities run one by one")
