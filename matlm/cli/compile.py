"""`matlm compile`: will a recipe fit the slice it names? Compiles its real train and
eval steps ahead of time for a TPU topology (no hardware: libtpu describes the chips) or
this machine's devices, and prints memory per device against HBM, FLOPs per step and the
step time at 50 % MFU. The last line of stdout is one JSON object. Exit 0 when it fits,
1 when it does not, 2 on bad input. Any model family: an LM recipe's step reads token
rows, a MatViT recipe's images (work counted in patches). See docs/compile.md and
docs/compile_vit.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from tabulate import tabulate

from matlm.cli import flags
from matlm.gin_config import model_config_from_gin, parse_gin, train_config_from_gin

GiB = 1 << 30

PARENTS = [flags.gin_files("the run recipe's gin file(s) (repeatable), e.g. "
                           "configs/runs/c4_matlm_78m.gin", required=True)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", default=None,
                        help="v5e:4x4, v6e:8x8 (2-D), v4:2x2x2, v5p:2x2x4 (3-D), or local "
                             "(this machine's devices); default: the recipe's "
                             "'# slice: ...' header comment")
    parser.add_argument("--min_headroom", type=float, default=0.15,
                        help="HBM fraction that must stay free for meets_min_headroom "
                             "(default 0.15)")
    parser.add_argument("--skip_eval", action="store_true",
                        help="compile only the train step")


def _gib(n) -> str:
    if n is None:
        return "—"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.1f} MiB"


def _report_lines(report, recipe: str) -> list[str]:
    t = report.target
    rows = []
    steps = [("train step", report.train)] + ([("eval step", report.eval)] if report.eval else [])
    for name, step in steps:
        m = step.memory
        resident = m.peak if name == "train step" else report.eval_resident_peak
        rows.append([name, _gib(m.argument), _gib(m.output), _gib(m.alias), _gib(m.temp),
                     _gib(m.generated_code), _gib(resident)])
    if report.token_unit == "tokens":
        work = f"{report.tokens_per_step:,} tokens per step"
    else:  # Images, each cut into the same number of patches.
        work = (f"{report.examples_per_step:,} images × "
                f"{report.tokens_per_step // report.examples_per_step} patches = "
                f"{report.tokens_per_step:,} {report.token_unit} per step")
    lines = [f"{recipe} on {t.name}: {len(t.devices)} × {t.devices[0].device_kind}, "
             f"mesh {report.mesh_shape}, {work}"
             f"{f' in {report.microbatches} microbatches' if report.microbatches > 1 else ''}",
             "memory per device (peak = arguments + outputs − aliased + temporaries + code"
             "; the eval step's adds the resident optimizer state):",
             tabulate(rows, headers=["step", "arguments", "outputs", "aliased (donated)",
                                     "temporaries", "code", "peak"],
                      tablefmt="simple_outline", disable_numparse=True)]
    hbm = t.hbm_bytes
    if hbm is None:
        lines.append(f"verdict: needs {_gib(report.peak_bytes)} per device; this device's "
                     "memory is unknown")
    elif report.fits:
        lines.append(f"verdict: fits with {100 * report.headroom:.1f} % headroom "
                     f"({_gib(report.peak_bytes)} of {_gib(hbm)} per device, {t.hbm_source})"
                     + ("" if report.meets_min_headroom else
                        f" — less than the {100 * report.min_headroom:.0f} % asked for"))
    else:
        lines.append(f"verdict: does not fit by {_gib(report.peak_bytes - hbm)} "
                     f"({_gib(report.peak_bytes)} needed, {_gib(hbm)} per device, "
                     f"{t.hbm_source})")
    if report.train.memory.oom_total is not None:
        lines.append("(libtpu stopped the train step's compile for lack of HBM: only its "
                     "total is known, so no parts, FLOPs or step time)")
    lines.append(f"FLOPs per train step: {report.flops_per_step:.3e} in all, "
                 f"{report.flops_per_step / report.devices:.3e} per device (matlm's exact "
                 "count, as MFU uses it)"
                 + ("" if report.xla_flops_per_step is None else
                    f"; XLA cost analysis {report.xla_flops_per_step:.3e} (a scanned loop's "
                    "body counted once, fused kernels opaque)"))
    if report.step_time_at_50pct_mfu is not None:
        lines.append(f"step time at 50 % MFU: {report.step_time_at_50pct_mfu:.4g} s "
                     f"(peak {t.peak_flops:.3e} FLOP/s per device, {t.peak_source})")
    compile_s = report.train.compile_s + (report.eval.compile_s if report.eval else 0.0)
    lines.append(f"compile time: {compile_s:.1f} s (train {report.train.compile_s:.1f} s"
                 + (f", eval {report.eval.compile_s:.1f} s" if report.eval else "") + ")")
    return lines


def report_json(report, recipe: str) -> dict:
    t = report.target
    out = {"topology": t.name, "devices": len(t.devices),
           "device_kind": t.devices[0].device_kind, "recipe": recipe,
           "mesh": report.mesh_shape, "hbm_bytes_per_device": t.hbm_bytes,
           "peak_bytes_per_device": report.peak_bytes, "headroom": report.headroom,
           "fits": report.fits, "min_headroom": report.min_headroom,
           "meets_min_headroom": report.meets_min_headroom,
           "flops_per_step": report.flops_per_step,
           "flops_per_step_per_device": report.flops_per_step / report.devices,
           "xla_flops_per_step": report.xla_flops_per_step,
           "tokens_per_step": report.tokens_per_step, "token_unit": report.token_unit,
           "examples_per_step": report.examples_per_step, "microbatches": report.microbatches,
           "peak_flops_per_device": t.peak_flops,
           "step_time_at_50pct_mfu_s": report.step_time_at_50pct_mfu,
           "compile_s": report.train.compile_s + (report.eval.compile_s if report.eval else 0.0),
           "train_step": {**dataclasses.asdict(report.train.memory),
                          "peak": report.train.memory.peak,
                          "compile_s": report.train.compile_s,
                          "xla_optimal_seconds": report.train.xla_optimal_seconds}}
    if report.eval is not None:
        out["eval_step"] = {**dataclasses.asdict(report.eval.memory),
                            "peak": report.eval.memory.peak,
                            "resident_peak": report.eval_resident_peak,
                            "flops_per_device": report.eval.flops_per_device,
                            "compile_s": report.eval.compile_s}
    return out


def run(args, gin_bindings) -> int:
    from matlm.launch import topology as topology_lib
    topology = args.topology or topology_lib.slice_from_gin_files(args.gin_file)
    if not topology:
        raise topology_lib.TopologyError(
            "no topology: pass --topology=v5e:4x4 (or local), or name the slice in the "
            "recipe's header comment, e.g. '# slice: v5e:4x4'")
    if topology.strip() != "local":
        topology_lib.parse_topology(topology)  # A bad string fails before any work.
        if not os.environ.get("JAX_PLATFORMS"):
            # The host's own devices are not needed to compile for a TPU topology; CPU
            # only keeps JAX from also initialising libtpu as this host's backend.
            import jax
            jax.config.update("jax_platforms", "cpu")
    if not 0.0 <= args.min_headroom < 1.0:
        raise ValueError(f"--min_headroom must be in [0, 1), got {args.min_headroom}")
    parse_gin(args.gin_file, gin_bindings)
    model_config = model_config_from_gin()
    train_config = train_config_from_gin()
    target = topology_lib.make_target(topology)
    from matlm.launch.fit_check import check_fit
    report = check_fit(model_config, train_config, target, include_eval=not args.skip_eval,
                       min_headroom=args.min_headroom)
    recipe = " ".join(args.gin_file)
    print("\n".join(_report_lines(report, recipe)))
    print(json.dumps(report_json(report, recipe)), flush=True)
    return 0 if report.fits is not False else 1
