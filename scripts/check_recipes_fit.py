"""Checks that every pod recipe in configs/runs/ fits the slice it names.

Runs `matlm compile` (AOT for the recipe's TPU topology, no hardware; needs the `tpu`
extra) on each recipe in turn and prints one table: slice, memory per chip against HBM,
headroom, FLOPs per step, compile time. The last line is JSON (one object per recipe).
Exit code 1 if any recipe misses the minimum headroom.

    python scripts/check_recipes_fit.py          # configs/runs/c4_*.gin, then imagenet_*.gin
    python scripts/check_recipes_fit.py configs/runs/c4_matlm_78m.gin --skip_eval
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


# The pod recipes: the MatLM family (C4), then the MatViT family (ImageNet).
RECIPE_PATTERNS = ("c4_*.gin", "imagenet_*.gin")


def recipe_order(recipe: str) -> tuple:
    """LM recipes smallest first (the paper family's order: 78m ... 2.6b), then the rest by
    name (imagenet_matvit_b16, _l16)."""
    size = Path(recipe).stem.split("_")[-1]
    if Path(recipe).name.startswith("c4_") and size[-1] in "mb":
        return (0, float(size[:-1]) * (1000 if size[-1] == "b" else 1), recipe)
    return (1, 0.0, recipe)


def compile_recipe(recipe: str, extra: list[str]) -> dict:
    """The JSON report of `matlm compile` for one recipe (its last stdout line)."""
    cmd = [sys.executable, "-m", "matlm.cli.main", "compile", f"--gin_file={recipe}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode not in (0, 1) or not lines:
        raise SystemExit(f"{recipe}: matlm compile failed (exit {proc.returncode}):\n"
                         f"{proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*",
                        help="gin files (default: configs/runs/c4_*.gin and imagenet_*.gin)")
    parser.add_argument("--skip_eval", action="store_true", help="compile only the train steps")
    args = parser.parse_args()
    recipes = args.recipes or [str(p.relative_to(REPO)) for pattern in RECIPE_PATTERNS
                               for p in (REPO / "configs/runs").glob(pattern)]
    recipes.sort(key=recipe_order)
    reports = []
    for recipe in recipes:
        print(f"compiling {recipe} …", file=sys.stderr, flush=True)
        reports.append({"recipe": recipe,
                        **compile_recipe(recipe, ["--skip_eval"] if args.skip_eval else [])})
        r = reports[-1]
        print(f"  {r['topology']}: {r['peak_bytes_per_device'] / GIB:.2f} GiB per chip, "
              f"headroom {r['headroom']:.0%}, compile {r['compile_s']:.0f} s",
              file=sys.stderr, flush=True)
    rows = [[Path(r["recipe"]).name, r["topology"], str(r["mesh"]).replace("'", ""),
             f"{r['peak_bytes_per_device'] / GIB:.2f} / {r['hbm_bytes_per_device'] / GIB:.2f}",
             f"{r['headroom']:.0%}", f"{r['flops_per_step']:.3g}",
             f"{r['step_time_at_50pct_mfu_s']:.2f}" if r.get("step_time_at_50pct_mfu_s") else "–",
             f"{r['compile_s']:.0f}"] for r in reports]
    print(tabulate(rows, headers=["recipe", "slice", "mesh", "GiB per chip / HBM", "headroom",
                                  "FLOPs per step", "step s @ 50 % MFU", "compile s"],
                   tablefmt="github"))
    print(json.dumps(reports))
    return 0 if all(r["meets_min_headroom"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
