#!/usr/bin/env python
"""Benchmark the MatFormer train step: joint (all granularities) vs joint with in-place
distillation vs XL-only vs masked joint vs a dense model, with this machine's matmul peak
measured in the same run.

Each variant is a full optimizer step (forward, backward, AdamW update) on one device.
Variants are interleaved in rounds (`--steps` rounds of `--block` back-to-back steps) and
the best kept, so a noisy neighbour slows every variant alike. The last line is one JSON
object for scripts. The script re-executes itself once with huge-page malloc (see
matlm/runtime.py), as the `matlm` command does.

With torch available (here, or in the interpreter given by `--torch_python`) it also
times scripts/torch_reference_train.py, the same joint step in PyTorch eager (a loop
over the widths), on the same parameters and tokens, after checking that its first-step
losses equal matlm's.

  python scripts/benchmark_train.py   # issue-4 shape: d512, 8 layers, d_ff 2048, seq 256, batch 8
  python scripts/benchmark_train.py --torch_python /path/to/venv-with-torch/bin/python
  python scripts/benchmark_train.py --seq_lens=256,1024,2048   # batch 8/2/1: same tokens/step

`--seq_lens` runs the whole benchmark once per sequence length with the batch scaled so
that every step holds the same tokens (`--batch` × `--seq_len`), then prints a summary
across lengths; its last line is one JSON object with a list of the per-length results.
"""
from __future__ import annotations

from matlm.runtime import reexec_with_hugepage_malloc

if __name__ == "__main__":  # Run as a script, not when imported (tests, other benchmarks).
    reexec_with_hugepage_malloc()  # Before anything allocates: see matlm/runtime.py.

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(__file__))
from benchmark_model import matmul_peak_gflops, time_interleaved  # noqa: E402

from matlm.model import MatLM, ModelConfig  # noqa: E402
from matlm.model.attention import resolve_impl  # noqa: E402
from matlm.model.counting import joint_train_flops_per_token, train_flops_per_token  # noqa: E402
from matlm.model.layout import unstack_layers  # noqa: E402
from matlm.model.reference import dense_forward  # noqa: E402
from matlm.training import mesh as mesh_lib  # noqa: E402
from matlm.training.config import TrainConfig  # noqa: E402
from matlm.training.objective import build_objective, logits_loss, token_losses  # noqa: E402
from matlm.training.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from matlm.training.train_step import init_state, make_train_step  # noqa: E402


def dense_train_step(config, optimizer):
    """The same optimizer step around the plain dense decoder (matlm.model.reference)."""
    # In the nested model's compute dtype (bfloat16 on a GPU): the same arithmetic.
    dtype = jnp.dtype(config.compute_dtype)

    def step(state, batch):
        def loss_fn(params):
            params = jax.tree.map(lambda x: x.astype(dtype), params)
            logits = dense_forward(config, params, batch["inputs"], batch["segment_ids"],
                                   batch["positions"]).astype(jnp.float32)
            ce, _ = token_losses(logits, batch["targets"])
            return (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), {"loss": loss}
    return jax.jit(step, donate_argnums=(0,))


def train_step_variants(config, train, mesh, distill_weight=None):
    """(jitted steps by name, executed train FLOPs per token by name, the joint objective)
    of the variants this benchmark (and scripts/gpu_check.py) times: joint (all
    granularities, shared streams), joint_distill (if `distill_weight`), xl_only,
    masked_joint (traced widths: full FLOPs for every granularity) and dense (the plain
    dense decoder of the XL's size, matlm.model.reference)."""
    optimizer, schedule = make_optimizer(train), learning_rate_schedule(train)
    joint = build_objective(config, train)
    xl_only = build_objective(config, dataclasses.replace(train, granularities=("XL",)))
    # Traced-width (masked) FFNs: the same joint objective, full FLOPs for every granularity.
    masked = dataclasses.replace(joint, widths=tuple(jnp.asarray(w, jnp.int32)
                                                     for w in joint.widths))
    objectives = [("joint", joint)]
    if distill_weight is not None:
        # In-place distillation (docs/objective.md): the same joint pass, plus each smaller
        # granularity's KL to XL on logits the step computes anyway.
        objectives.append(("joint_distill", build_objective(config, dataclasses.replace(
            train, distill_weight=distill_weight))))
    objectives += [("xl_only", xl_only), ("masked_joint", masked)]
    steps = {name: make_train_step(config, objective, optimizer, schedule, mesh)
             for name, objective in objectives}
    steps["dense"] = dense_train_step(config, optimizer)
    full = train_flops_per_token(config, train.seq_len)
    # Executed FLOPs: the joint step shares residual streams (at least layer 0) across
    # granularities; the masked step runs each granularity whole.
    flops = {"joint": joint_train_flops_per_token(config, train.seq_len, joint.widths),
             "xl_only": full, "masked_joint": len(joint.widths) * full, "dense": full}
    if distill_weight is not None:
        flops["joint_distill"] = flops["joint"]  # The KL is elementwise: no matmul FLOPs.
    return steps, flops, joint


class TorchEagerReference:
    """scripts/torch_reference_train.py (PyTorch eager, a loop over the widths) on the same
    model, parameters and tokens as matlm. The inputs are written and matlm's first-step
    losses computed once; each `run` times the reference in a fresh process and checks
    that its first-step losses match matlm's (SystemExit if not)."""

    def __init__(self, torch_python, config, train, objective, params, batch, tokens):
        if config.gated or not config.tie_embeddings or config.ffn_nest_blocks != 1 \
                or config.num_kv_heads != config.n_heads:
            raise SystemExit("--torch_python: the PyTorch reference implements the GELU, "
                             "tied-embedding, multi-head, ffn_nest_blocks=1 model only")
        self.torch_python = torch_python
        logits_G = jax.jit(lambda p, b: MatLM(config).apply(
            {"params": p}, b["inputs"], b["segment_ids"], b["positions"],
            joint_widths=objective.widths))(params, batch)
        self.matlm_losses = [float(logits_loss(logits, batch, 0.0)[1]) for logits in logits_G]
        self.spec = {
            "n_layers": config.n_layers, "n_heads": config.n_heads,
            "widths": [list(map(int, w)) for w in objective.widths],
            "weights": list(objective.weights), "rope_theta": config.rope_theta,
            "norm_eps": config.norm_eps, "learning_rate": train.learning_rate,
            "adam_b1": train.adam_b1, "adam_b2": train.adam_b2, "adam_eps": train.adam_eps,
            "weight_decay": train.weight_decay, "clip_grad_norm": train.clip_grad_norm}
        # The reference reads per-layer names (layer_{i}/...): unstack scanned layers.
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(unstack_layers(params))[0]}
        self._tmp = tempfile.TemporaryDirectory()
        self.npz = os.path.join(self._tmp.name, "reference.npz")
        np.savez(self.npz, tokens=tokens, **flat)

    def run(self, steps):
        """(best step seconds, torch's matmul peak, report) of `steps` timed steps."""
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "torch_reference_train.py")
        proc = subprocess.run([self.torch_python, script, "--npz", self.npz,
                               "--spec", json.dumps(self.spec), "--steps", str(steps)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the PyTorch reference failed ({self.torch_python}):\n"
                             f"{proc.stderr[-2000:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        # Same model, same parameters, same tokens: the losses agree to float32 rounding,
        # or the comparison would be between different computations.
        worst = max(abs(a - b) / abs(b) for a, b in zip(report["losses"], self.matlm_losses))
        if worst > 1e-4:
            raise SystemExit(f"the PyTorch reference computes a different model: first-step "
                             f"losses {report['losses']} vs matlm {self.matlm_losses}")
        report["max_relative_loss_difference"] = worst
        return min(report["step_times"]), report["peak_gflops"], report

    def close(self):
        self._tmp.cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_lens", default="",
                        help="comma-separated sequence lengths to run one after another, each "
                             "with batch = batch × seq_len / length (same tokens per step)")
    parser.add_argument("--attention_impl", default="auto",
                        help="ModelConfig.attention_impl (auto: the platform's fused kernel, "
                             "blocked XLA on CPU)")
    for flag, default in [("d_model", 512), ("n_layers", 8), ("n_heads", 8), ("d_ff", 2048),
                          ("seq_len", 256), ("batch", 8), ("vocab", 8192), ("steps", 4)]:
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--block", type=int, default=2,
                        help="optimizer steps per variant per round, back to back as in a "
                             "training loop (timed rounds: --steps)")
    # GELU (two FFN kernels) is the shape the targets were set for: FLOP ratio ≈ 0.72.
    parser.add_argument("--activation", default="gelu", choices=("gelu", "swiglu", "geglu"))
    parser.add_argument("--distill_weight", type=float, default=0.5,
                        help="α of the joint_distill variant (TrainConfig.distill_weight)")
    parser.add_argument("--loss_chunk", type=int, default=0,
                        help="TrainConfig.loss_chunk_size of every variant (0: the CE "
                             "in one piece; every shape holds the same tokens per step)")
    parser.add_argument("--torch_python", default=None,
                        help="a Python interpreter with torch: also time the PyTorch eager "
                             "reference (scripts/torch_reference_train.py) on the same model "
                             "(default: this interpreter if it has torch, else skipped)")
    args = parser.parse_args()
    if args.torch_python is None and importlib.util.find_spec("torch") is not None:
        args.torch_python = sys.executable
    if not args.seq_lens:
        print(json.dumps(benchmark(args)))
        return
    tokens_per_step = args.batch * args.seq_len
    lengths = [int(t) for t in args.seq_lens.split(",")]
    for T in lengths:
        if T <= 0 or tokens_per_step % T:
            parser.error(f"--seq_lens: {T} does not divide the {tokens_per_step} tokens per "
                         f"step (--batch {args.batch} × --seq_len {args.seq_len}); pick "
                         "lengths that do, or change --batch/--seq_len")
    results = []
    for T in lengths:
        print(f"\n=== seq_len {T}, batch {tokens_per_step // T} ===")
        one = benchmark(argparse.Namespace(**{**vars(args), "seq_len": T,
                                              "batch": tokens_per_step // T}))
        print(json.dumps(one))
        results.append({"seq_len": T, "batch": tokens_per_step // T, **one})
    print(f"\nthe joint step across sequence lengths, {tokens_per_step} tokens per step:")
    print(tabulate([[r["seq_len"], r["batch"], f"{r['joint_tokens_per_s']:,.0f}",
                     f"{r['mfu_joint']:.0%}", f"{r['sliced_over_masked_time']:.3f}",
                     f"{r['sliced_over_masked_flops']:.3f}"] for r in results],
                   headers=["seq", "batch", "joint tokens/s", "joint of peak",
                            "sliced/masked time", "sliced/masked FLOPs"],
                   tablefmt="simple_outline", disable_numparse=True))
    print(json.dumps({"tokens_per_step": tokens_per_step, "seq_lens": results}))


def benchmark(args) -> dict:
    """One shape: prints the report and returns the summary (the JSON line's object)."""
    config = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
                         n_heads=args.n_heads, d_ff=args.d_ff, activation=args.activation,
                         attention_impl=args.attention_impl)
    # Cross entropy in one piece by default (--loss_chunk 0): every shape holds the same
    # tokens per step, so the logits are as large at seq 2048 as at 256, and chunking
    # would only add its recompute.
    train = TrainConfig(steps=1000, seq_len=args.seq_len, global_batch_size=args.batch,
                        mesh_shape=(1, 1, 1), loss_chunk_size=args.loss_chunk)
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(train)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len + 1)).astype(np.int32)
    batch = mesh_lib.global_batch({
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((args.batch, args.seq_len), np.int32),
        "positions": np.tile(np.arange(args.seq_len), (args.batch, 1)).astype(np.int32),
        "loss_mask": np.ones((args.batch, args.seq_len), np.float32)}, mesh)

    steps, flops, joint = train_step_variants(config, train, mesh, args.distill_weight)
    state = init_state(config, optimizer, mesh, seed=0)
    # Each variant gets its own state, donated and replaced every step as in the trainer.
    states = {name: jax.tree.map(jnp.copy, state) for name in steps}

    def runner(name):
        def run(_):
            states[name], metrics = steps[name](states[name], batch)
            return metrics["loss"]
        return run

    # The matmul peak: the better of a standalone measurement and one interleaved with the
    # steps (same conditions), so that MFU is never flattered by a slow peak reading.
    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    # The PyTorch reference runs in its own process, so it cannot be interleaved with the
    # JAX rounds: it runs before and after them, half its steps each time, and keeps the
    # best, so a machine load that drifts during the run hits both sides alike.
    torch_runs = []
    reference = (TorchEagerReference(args.torch_python, config, train, joint, state.params,
                                     batch, tokens) if args.torch_python else None)

    def run_torch_reference():
        if reference:
            torch_runs.append(reference.run(max(1, args.steps * args.block // 2)))

    run_torch_reference()
    standalone_peak = matmul_peak_gflops()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = time_interleaved({"matmul": lambda _: matmul(a),
                              **{name: runner(name) for name in steps}}, (None,), args.steps,
                             block=args.block)
    faults_per_call = ((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
                       / ((len(steps) + 1) * (args.steps * args.block + 1)))
    peak = max(standalone_peak, 2 * 2048 ** 3 / times.pop("matmul") / 1e9)
    run_torch_reference()
    if reference:
        reference.close()
    n_tokens = args.batch * args.seq_len
    # The PyTorch loop runs each granularity whole.
    separate = sum(train_flops_per_token(config, args.seq_len, w) for w in joint.widths)
    torch_report = None
    if torch_runs:
        times["torch_eager"] = min(seconds for seconds, _, _ in torch_runs)
        torch_peak = max(peak for _, peak, _ in torch_runs)
        torch_report = dict(torch_runs[0][2], step_times=[
            t for _, _, report in torch_runs for t in report["step_times"]])
        flops["torch_eager"] = separate
    rows = []
    for name in ("joint", "joint_distill", "xl_only", "masked_joint", "dense", "torch_eager"):
        if name not in times:
            continue
        # Each framework against its own matmul peak (torch: MKL's 2048³ sgemm).
        own_peak = torch_peak if name == "torch_eager" else peak
        gflops = flops[name] * n_tokens / times[name] / 1e9
        rows.append([name, f"{times[name] * 1e3:.0f}", f"{n_tokens / times[name]:,.0f}",
                     f"{gflops:.1f}", f"{gflops / own_peak:.0%}"])
    print(f"device: {jax.devices()[0].device_kind}; fp32 matmul peak {peak:.1f} GFLOP/s "
          f"(2048³: the better of standalone and interleaved with the steps)")
    print(f"shape: d_model={args.d_model} layers={args.n_layers} heads={args.n_heads} "
          f"d_ff={args.d_ff} ({args.activation}) seq={args.seq_len} batch={args.batch} "
          f"vocab={args.vocab} attention={resolve_impl(config)}; "
          f"best of {args.steps} rounds × {args.block} back-to-back optimizer steps, "
          f"variants interleaved")
    huge = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
    print(f"malloc: {'transparent huge pages' if huge else '4 KiB pages'} "
          f"({faults_per_call:,.0f} minor page faults per call; matlm/runtime.py)")
    print(tabulate(rows, headers=["train step", "ms", "tokens/s", "GFLOP/s", "of peak"],
                   tablefmt="simple_outline", disable_numparse=True))
    time_ratio = times["joint"] / times["masked_joint"]
    flop_ratio = flops["joint"] / flops["masked_joint"]
    print(f"sliced joint / masked joint: time {time_ratio:.3f}, FLOPs {flop_ratio:.3f} "
          f"(target: time at most 5 % above FLOPs — slicing saves what it should)")
    temps = {name: steps[name].lower(states[name], batch).compile().memory_analysis()
             .temp_size_in_bytes for name in ("joint", "joint_distill")}
    distill_time = times["joint_distill"] / times["joint"]
    distill_temp = temps["joint_distill"] / temps["joint"]
    print(f"joint + distillation (α={args.distill_weight}) / joint: time {distill_time:.3f}, "
          f"temporaries {distill_temp:.3f} ({temps['joint_distill'] / 2**20:,.1f} vs "
          f"{temps['joint'] / 2**20:,.1f} MiB; loss chunk {args.loss_chunk or 'none'}) "
          f"(target: time at most 1.10, temporaries at most 1.10)")
    mfu = lambda name: flops[name] * n_tokens / times[name] / 1e9 / peak
    extra = {}
    if torch_report:
        print(f"torch_eager: PyTorch {torch_report['torch_version']} eager on "
              f"{torch_report['threads']} threads, a loop over the {len(joint.widths)} widths "
              f"(scripts/torch_reference_train.py), best of {len(torch_report['step_times'])} "
              f"steps run before and after the JAX rounds; its own fp32 matmul peak (2048³) "
              f"{torch_peak:.1f} GFLOP/s; "
              f"first-step losses match matlm's to "
              f"{torch_report['max_relative_loss_difference']:.1e} (relative)")
        print(f"matlm joint step vs PyTorch eager: "
              f"{times['torch_eager'] / times['joint']:.2f}× the tokens/s")
        extra = {"torch_eager_tokens_per_s": round(n_tokens / times["torch_eager"], 1),
                 "torch_peak_gflops": round(torch_peak, 1),
                 "mfu_torch_eager": round(flops["torch_eager"] * n_tokens
                                          / times["torch_eager"] / 1e9 / torch_peak, 4),
                 "joint_over_torch_eager_tokens_per_s": round(
                     times["torch_eager"] / times["joint"], 3)}
    else:
        print("torch_eager: skipped (no torch here; pass --torch_python PYTHON with an "
              "interpreter that has torch to time the PyTorch eager reference)")
    return {
        "joint_tokens_per_s": round(n_tokens / times["joint"], 1),
        "xl_only_tokens_per_s": round(n_tokens / times["xl_only"], 1),
        "masked_joint_tokens_per_s": round(n_tokens / times["masked_joint"], 1),
        "dense_tokens_per_s": round(n_tokens / times["dense"], 1),
        "peak_gflops": round(peak, 1), "mfu_joint": round(mfu("joint"), 4),
        "mfu_xl": round(mfu("xl_only"), 4),
        "sliced_over_masked_time": round(time_ratio, 4),
        "sliced_over_masked_flops": round(flop_ratio, 4),
        "distill_over_joint_time": round(distill_time, 4),
        "distill_over_joint_temporaries": round(distill_temp, 4), "huge_pages": huge, **extra}


if __name__ == "__main__":
    main()
