#!/usr/bin/env python
"""One command for a GPU (issue 29): correctness tests on the device, bf16 train-step MFU,
`matlm compile`'s predicted memory against the measured peak, KV-cache and speculative
decoding after a short training run. Writes gpu_check.json and gpu_check.md to --output.

    python scripts/gpu_check.py --output=$OUT            # one H200: about 8 minutes
    python scripts/gpu_check.py --output=/tmp/g --smoke  # tiny shapes on CPU, < 60 s

Needs neither TensorFlow, seqio nor gin-config (the GPU image has none): the recipes'
shapes are read from their gin files by a literal reader (`recipe_bindings`), the text is
the embedded Wikipedia sample (`matlm.data.embedded_tokens`; --wiki_dump where gensim is
not installed). Sections, each with its own time budget (a share of --budget_s, unused
time passing on to the next); the JSON is rewritten after every measurement, so a
section that fails or runs out of time leaves what it measured and says why:

  tests           the GPU-relevant tests under JAX_PLATFORMS=cuda (pytest, junit XML)
  compile_memory  the 850M train step: `matlm compile --topology=local`'s predicted peak
                  (launch.fit_check: the compiled step's memory analysis) vs the device's
                  measured peak_bytes_in_use (first on the device, so the peak is the step's)
  peaks           an 8192³ bf16 matmul and a device copy: measured FLOP/s and bytes/s
  train_mfu       180M and 850M recipe shapes at seq 2048, bf16, the platform's attention
                  (cuDNN on a GPU): joint / XL only / masked joint / dense, tokens/s, MFU
                  against the data-sheet peak and the measured matmul
  training        the 850M shape (vocabulary 8192) trained for --train_s on the embedded
                  corpus, joint objective: validation loss per granularity before/after
  kv_cache        KV-cache tokens/s at batch 1 and 16 for XL and S against the
                  memory-bandwidth limit (bytes read per token / measured copy bandwidth)
  speculative     XL with an S and a Mix'n'Match draft, k in {2, 4, 8}, own or shared
                  cache: acceptance, tokens/s, speed-up over KV-cache XL, and the cost
                  model (draft cost / target cost, verify cost / one-token cost)
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from matlm.messages import error_summary  # noqa: E402  (light: no JAX, no TensorFlow)

# The device tests (node ids): cuDNN attention against the blocked XLA oracle (forward and
# gradients, packed segments); train-step equality across widths; KV cache against full
# recomputation.
DEVICE_TESTS = (
    "tests/test_attention.py::test_cudnn_matches_xla_on_gpu",
    "tests/test_train_step.py::test_joint_loss_over_shared_streams_equals_granularities_one_by_one",
    "tests/test_model.py::test_joint_pass_gradients_equal_separate_passes",
    "tests/test_decode_cache.py::test_prefill_then_single_steps_equal_full_recomputation",
    "tests/test_decode_cache.py::test_multi_token_extends_equal_full_recomputation",
)
# Smoke: the skip path (no GPU) and one quick case that runs.
SMOKE_TESTS = (DEVICE_TESTS[0], DEVICE_TESTS[3] + "[mha-full]")

# Shares of --budget_s, in running order. The tests first: their process must have the
# GPU before this one takes its memory. The memory probe next: the device's peak counter
# only ever grows, so it must see the train step before anything larger.
SECTIONS = {"tests": 0.13, "environment": 0.04, "compile_memory": 0.07, "peaks": 0.01,
            "train_mfu": 0.25, "training": 0.27, "kv_cache": 0.08, "speculative": 0.15}

# The same order, shares for --smoke (compiles dominate on a CPU, not steps).
SMOKE_SECTIONS = {"tests": 0.14, "environment": 0.12, "compile_memory": 0.1, "peaks": 0.02,
                  "train_mfu": 0.18, "training": 0.12, "kv_cache": 0.1, "speculative": 0.22}

RECIPES = {"180m": "configs/runs/c4_matlm_180m.gin", "850m": "configs/runs/c4_matlm_850m.gin"}


# ---- recipes without gin ---------------------------------------------------------------

def recipe_bindings(path, classes=("ModelConfig", "TrainConfig")) -> dict:
    """{'ModelConfig.d_model': 1536, ...}: a gin file's (and its includes') bindings of
    `classes`, later lines winning, as gin applies them; other lines (imports, other
    configurables) are skipped. Only literals (numbers, strings, tuples, booleans, None):
    anything else (a macro, a reference) is a ValueError, so a recipe this cannot read is
    refused rather than misread."""
    path = Path(path)
    if not path.is_absolute():
        path = REPO / path
    statements, current = [], ""
    for line in path.read_text().splitlines():  # Join values continued over lines.
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        current = f"{current} {line}" if current else line
        if current.count("(") == current.count(")") and current.count("[") == current.count("]"):
            statements.append(current)
            current = ""
    bindings = {}
    for statement in statements:
        if statement.startswith("include "):
            bindings.update(recipe_bindings(ast.literal_eval(statement[len("include "):]),
                                            classes))
            continue
        name, _, value = (part.strip() for part in statement.partition("="))
        if name.split(".", 1)[0] not in classes:
            continue
        try:
            bindings[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{path}: cannot read {statement!r} without gin (not a "
                             "literal)") from None
    return bindings


def recipe_configs(recipe: str, **train_overrides):
    """(ModelConfig, TrainConfig) of a run recipe (its literal bindings), TrainConfig
    fields overridden (e.g. a local batch and mesh)."""
    from matlm.model import ModelConfig
    from matlm.training.config import TrainConfig
    bindings = recipe_bindings(recipe)

    def fields(cls_name, cls):
        names = {f.name for f in dataclasses.fields(cls)}
        return {k.split(".", 1)[1]: v for k, v in bindings.items()
                if k.split(".", 1)[0] == cls_name and k.split(".", 1)[1] in names}
    model = ModelConfig(**fields("ModelConfig", ModelConfig))
    train = TrainConfig(**{**fields("TrainConfig", TrainConfig), **train_overrides})
    return model, train


# ---- the record ------------------------------------------------------------------------

class Record:
    """gpu_check.json (every section, rewritten after each measurement) and gpu_check.md."""

    def __init__(self, output: Path, budget_s: float, shares: dict):
        self.output, self.budget_s, self.start = output, budget_s, time.perf_counter()
        self.shares = shares
        self.data = {"sections": {}}
        self.used_share = 0.0

    def section(self, name) -> dict:
        return self.data["sections"].setdefault(name, {"status": "not run"})

    def deadline(self, name) -> float:
        """When `name` must stop starting work (perf_counter seconds): its share plus
        whatever earlier sections left unused, and at least half its share even when
        they overran (so the whole may overrun by half a share at most)."""
        self.used_share += self.shares[name]
        share = self.shares[name] * self.budget_s
        return max(self.start + self.used_share * self.budget_s,
                   time.perf_counter() + share / 2)

    def write(self):
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        (self.output / "gpu_check.json").write_text(json.dumps(self.data, indent=1,
                                                               default=str))
        (self.output / "gpu_check.md").write_text(render_markdown(self.data))


class OutOfTime(Exception):
    """A section's budget ran out before its next unit of work."""


def left(deadline) -> float:
    return deadline - time.perf_counter()


def need(deadline, what: str, seconds: float = 0.0):
    if left(deadline) < seconds:
        raise OutOfTime(f"out of time before {what} (budget; --budget_s raises it)")


# ---- sections --------------------------------------------------------------------------

def environment(args, out: dict, deadline):
    import jax
    device = jax.devices()[0]
    from matlm.training.metrics import peak_flops_per_device
    peak, source = peak_flops_per_device(None)
    out.update(device=device.device_kind, platform=device.platform,
               device_count=jax.device_count(), jax=jax.__version__,
               jaxlib=__import__("jaxlib").__version__,
               python=sys.version.split()[0],
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join([Path(sys.executable).name, *sys.argv]),
               smoke=args.smoke, budget_s=args.budget_s,
               datasheet_peak_flops=peak, datasheet_peak_source=source,
               tensorflow_importable=importlib.util.find_spec("tensorflow") is not None,
               gin_importable=importlib.util.find_spec("gin") is not None)


def run_tests(args, out: dict, deadline):
    """The device tests in a pytest subprocess; outcomes from its junit XML."""
    tests = SMOKE_TESTS if args.smoke else DEVICE_TESTS
    out["node_ids"] = list(tests)
    if importlib.util.find_spec("pytest") is None:
        out.update(status="skipped", reason="pytest is not installed in this interpreter")
        return
    junit = args.output / "tests_junit.xml"
    env = dict(os.environ, JAX_PLATFORMS=args.platform or os.environ.get("JAX_PLATFORMS", ""),
               # The equality tests compare float32 paths at float32 tolerances: TF32
               # matmuls (JAX's GPU default) would fail them by design, not by a bug.
               JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(
                   p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p))
    out["env"] = {k: env[k] for k in ("JAX_PLATFORMS", "JAX_DEFAULT_MATMUL_PRECISION")}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"--junitxml={junit}", *tests], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=max(5.0, left(deadline)))
    except subprocess.TimeoutExpired:
        # Interrupted, pytest still writes the junit XML of the tests that finished (a kill
        # would lose them all); killed only if it does not stop within 20 s.
        out["timed_out"] = True
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    out["returncode"] = proc.returncode
    out["output_tail"] = (output or "")[-3000:]
    cases = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.get("name") is None:  # The test the interrupt stopped: no name, no outcome.
                cases.append({"test": "(stopped by the time limit)", "outcome": "interrupted",
                              "seconds": float(case.get("time") or 0), "message": ""})
                continue
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (node.get("message") or "")[:300]
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                          "outcome": outcome, "seconds": float(case.get("time") or 0),
                          "message": message})
    out["cases"] = cases
    out["counts"] = {k: sum(c["outcome"] == k for c in cases)
                     for k in ("passed", "failed", "error", "skipped", "interrupted")}
    if out.get("timed_out"):
        raise OutOfTime("the tests ran past their budget")
    if not cases:
        raise RuntimeError("pytest reported no test cases: " + out.get("output_tail", "")[-300:])


def shapes(args):
    """{name: (ModelConfig, TrainConfig)} of the MFU shapes: the 180M and 850M recipes at
    seq 2048, bfloat16, one device, the local batch; tiny ones under --smoke."""
    overrides = dict(mesh_shape=(1, 1, 1), steps=1000, warmup_steps=10)
    if args.smoke:
        from matlm.model import ModelConfig
        from matlm.training.config import TrainConfig
        model = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, d_ff=256,
                            compute_dtype="float32", scan_layers=True)
        train = TrainConfig(seq_len=64, global_batch_size=2, loss_chunk_size=0, **overrides)
        return {"smoke": (model, train)}
    out = {}
    for name, recipe in RECIPES.items():
        model, train = recipe_configs(recipe, seq_len=2048,
                                      global_batch_size=getattr(args, f"batch_{name}"),
                                      **overrides)
        # The recipes' 'full' remat is for 16 GiB TPU chips; one large GPU holds the
        # model gin's policy, which recomputes less (MFU counts no recompute).
        model = dataclasses.replace(model, remat_policy=args.remat,
                                    attention_impl=args.attention_impl)
        out[name] = (model, train)
    return out


def compiled_step(cache: dict, key, model, train, mesh, variant="joint"):
    """(compiled executable, executed train FLOPs per token, compile seconds) of a
    train-step variant (`benchmark_train.train_step_variants`), compiled once."""
    if key not in cache:
        from benchmark_train import train_step_variants
        from matlm.launch.fit_check import abstract_batch
        from matlm.training.optimizer import make_optimizer
        from matlm.training.train_step import abstract_state
        steps, flops, _ = train_step_variants(model, train, mesh)
        state = abstract_state(model, make_optimizer(train), mesh)
        start = time.perf_counter()
        compiled = steps[variant].lower(state, abstract_batch(model, train, mesh)).compile()
        cache[key] = (compiled, flops[variant], time.perf_counter() - start)
    return cache[key]


def compile_memory(args, out: dict, deadline, ctx):
    """`matlm compile --topology=local`'s prediction (the compiled step's memory analysis,
    as launch.fit_check reports it) against the device's measured peak for one step."""
    import jax
    from matlm.launch.fit_check import StepMemory, lower_train_step
    from matlm.launch.topology import make_target
    from matlm.model.counting import joint_train_flops_per_token
    from matlm.training.objective import build_objective
    from matlm.training.optimizer import make_optimizer
    from matlm.training.train_step import init_state
    name = "smoke" if args.smoke else "850m"
    model, train = ctx["shapes"][name]
    mesh = ctx["mesh"]
    device = jax.devices()[0]
    target = make_target("local")
    out.update(shape=name, batch=train.global_batch_size, seq_len=train.seq_len,
               device_memory_limit=target.hbm_bytes, limit_source=target.hbm_source)
    # The step `matlm compile` compiles (launch.fit_check), compiled as it does; the MFU
    # section times the same executable as its joint variant.
    step, abstract_args, _ = lower_train_step(model, train, mesh)
    start = time.perf_counter()
    compiled = step.lower(*abstract_args).compile()
    compile_s = time.perf_counter() - start
    flops = joint_train_flops_per_token(model, train.seq_len,
                                        build_objective(model, train).widths)
    ctx["compiled"][(name, "joint")] = (compiled, flops, compile_s)
    memory = StepMemory.of(compiled)
    out.update(compile_s=round(compile_s, 1), predicted_peak_bytes=memory.peak,
               predicted=dataclasses.asdict(memory))
    stats = device.memory_stats() or {}
    after_compile = stats.get("peak_bytes_in_use")
    state = init_state(model, make_optimizer(train), mesh, seed=0)
    batch = ctx["synthetic_batch"](model, train)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    stats = device.memory_stats() or {}
    measured = stats.get("peak_bytes_in_use")
    out.update(peak_after_compile_bytes=after_compile, measured_peak_bytes=measured)
    if measured is None:
        out["measured_reason"] = (f"{device.platform} devices report no memory_stats "
                                  "(a GPU does)")
    else:
        out["measured_over_predicted"] = round(measured / memory.peak, 4)
        if after_compile and after_compile >= measured:
            out["note"] = ("the peak was reached while compiling (autotuning scratch), so "
                           "the step's own peak is at most this")
    del state, batch  # Freed before the next section allocates.


def peaks(args, out: dict, deadline, ctx):
    """The measured ceilings: an n³ matmul (bf16 on a GPU) and a device-to-device copy
    (bytes read + written), each a jitted loop of dependent iterations, best of 5."""
    import jax
    import jax.numpy as jnp
    from benchmark_model import time_interleaved
    gpu = jax.devices()[0].platform == "gpu"
    n = 512 if args.smoke else 8192
    dtype = jnp.bfloat16 if gpu else jnp.float32
    reps = 10
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)  # Not zeros.
    b = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n ** 0.5).astype(dtype)
    chain = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda _, x: x @ b, a))
    seconds = time_interleaved({"mm": chain}, (a, b), 5)["mm"]
    out.update(matmul_n=n, matmul_dtype=jnp.dtype(dtype).name,
               matmul_flops=2 * n ** 3 * reps / seconds)
    del a, b
    words = (1 << 20) if args.smoke else (1 << 29)  # 4 MiB / 2 GiB of float32.
    x = jax.random.normal(jax.random.key(2), (words,), jnp.float32)
    copy = jax.jit(lambda x: jax.lax.fori_loop(0, reps, lambda _, y: y * 1.0001 + 1e-4, x))
    seconds = time_interleaved({"copy": copy}, (x,), 5)["copy"]
    out.update(copy_bytes=words * 4, copy_bytes_per_s=2 * words * 4 * reps / seconds)
    del x
    ctx["matmul_flops"], ctx["copy_bw"] = out["matmul_flops"], out["copy_bytes_per_s"]


def train_mfu(args, out: dict, deadline, ctx):
    """Each shape's four variants, tokens/s and MFU (best of --mfu_steps steps)."""
    import jax
    import jax.numpy as jnp
    from matlm.launch.fit_check import StepMemory
    from matlm.training.optimizer import make_optimizer
    from matlm.training.train_step import init_state
    datasheet = ctx["environment"]["datasheet_peak_flops"]
    measured = ctx.get("matmul_flops")
    out.update(datasheet_peak_flops=datasheet, measured_matmul_flops=measured, rows=[])
    # The dense reference materialises [B, H, T, T] scores (XLA attention): last.
    order = ["joint", "xl_only", "masked_joint", "dense"]
    for name in (["smoke"] if args.smoke else ["850m", "180m"]):
        model, train = ctx["shapes"][name]
        batch = ctx["synthetic_batch"](model, train)
        base = init_state(model, make_optimizer(train), ctx["mesh"], seed=0)
        for variant in order:
            need(deadline, f"{name} {variant}", 5)
            row = {"shape": name, "variant": variant, "batch": train.global_batch_size,
                   "seq_len": train.seq_len, "remat": model.remat_policy,
                   "attention": ctx["attention_impl"](model)}
            out["rows"].append(row)
            try:
                compiled, flops, compile_s = compiled_step(
                    ctx["compiled"], (name, variant), model, train, ctx["mesh"], variant)
                state = jax.tree.map(jnp.copy, base)
                times = []
                for i in range(args.mfu_steps + 1):  # The first one warms up.
                    start = time.perf_counter()
                    state, metrics = compiled(state, batch)
                    jax.block_until_ready(metrics["loss"])
                    times.append(time.perf_counter() - start)
                    if left(deadline) < 0 and i >= 1:
                        break
                best = min(times[1:] or times)
                tokens = train.global_batch_size * train.seq_len
                achieved = flops * tokens / best
                row.update(compile_s=round(compile_s, 1), step_s=best, steps_timed=len(times) - 1,
                           tokens_per_s=tokens / best, flops_per_token=flops,
                           achieved_flops=achieved, mfu_datasheet=achieved / datasheet,
                           mfu_measured_matmul=achieved / measured if measured else None,
                           loss=float(metrics["loss"]),
                           predicted_peak_bytes=StepMemory.of(compiled).peak)
                if args.trace and variant == "joint" and "trace" not in out:
                    out["trace"] = profile_one_step(compiled, state, batch, args.output)
                del state
            except OutOfTime:
                raise
            except Exception as e:  # One variant (an OOM, say) does not stop the others.
                row["error"] = error_summary(e, 300)
            finally:
                ctx["compiled"].pop((name, variant), None)  # Frees its executable.
            ctx["record"].write()
        del base, batch


def profile_one_step(compiled, state, batch, output: Path) -> dict:
    """A jax.profiler trace of one step, packed into one file (trace.tar.gz: the device
    tool brings back files at most two folders down; a trace sits deeper), and its
    costliest ops (`top_ops`)."""
    import shutil
    import tempfile
    import jax
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics["loss"])
        archive = shutil.make_archive(str(output / "trace"), "gztar", tmp)
        traces = sorted(Path(tmp).rglob("*.trace.json.gz"))
        return {"archive": archive, "top_ops": top_ops(traces[0]) if traces else []}


def top_ops(trace_path: Path, n: int = 10) -> list:
    """[(op, ms, share)] of the largest total durations in a Chrome-format trace: the
    device's kernels where it has any (a GPU), else the host's non-Python events."""
    import collections
    import gzip
    data = json.load(gzip.open(trace_path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if "/device:" in name}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if (e["pid"] in device) if device else not e["name"].startswith("$"):
            totals[e["name"]] += e["dur"]
    everything = sum(totals.values()) or 1
    return [(name, round(us / 1e3, 3), round(us / everything, 4))
            for name, us in totals.most_common(n)]


def training(args, out: dict, deadline, ctx):
    """The 850M shape with the embedded vocabulary, trained for --train_s seconds on the
    embedded corpus (joint objective, bf16); validation loss per granularity before and
    after. The decoding sections decode with these parameters."""
    import jax
    from matlm.data import embedded_tokens, vocabulary
    from matlm.training import mesh as mesh_lib
    from matlm.training.objective import build_objective
    from matlm.training.optimizer import learning_rate_schedule, make_optimizer
    from matlm.training.train_step import init_state, make_eval_step, make_train_step
    model, train = ctx["decode_shape"]
    processor = corpus_processor(args, ctx)
    mesh = ctx["mesh"]
    start_id = vocabulary.start_id(processor)
    store = embedded_tokens.token_store(processor, "train", args.wiki_dump, args.max_articles)
    valid = embedded_tokens.token_store(processor, "validation", args.wiki_dump,
                                        args.max_articles)
    out.update(vocab_size=model.vocab_size, d_model=model.d_model, n_layers=model.n_layers,
               d_ff=model.d_ff, batch=train.global_batch_size, seq_len=train.seq_len,
               train_tokens_in_corpus=store.num_tokens, learning_rate=train.learning_rate)
    optimizer = make_optimizer(train)
    objective = build_objective(model, train)
    step = make_train_step(model, objective, optimizer, learning_rate_schedule(train), mesh)
    spec = model.granularities
    evaluate = make_eval_step(model, {n: spec.uniform(n) for n in spec.names}, mesh,
                              train.loss_chunk_size)
    valid_batch = mesh_lib.global_batch(next(embedded_tokens.packed_batches(
        valid, train.seq_len, train.global_batch_size, start_id, seed=1)), mesh)

    def validation_loss(params):
        metrics = jax.device_get(evaluate(params, valid_batch))  # {name: (sum CE, count)}
        return {name: float(total) / float(count) for name, (total, count) in metrics.items()}

    state = init_state(model, optimizer, mesh, seed=0)
    out["validation_before"] = validation_loss(state.params)
    batches = embedded_tokens.packed_batches(store, train.seq_len, train.global_batch_size,
                                             start_id, seed=0)
    stop = min(time.perf_counter() + args.train_s, deadline - ctx["reserve_after_training"])
    steps, losses, begin = 0, [], time.perf_counter()
    while steps < 3 or time.perf_counter() < stop:  # 3: a rate past the compiling step.
        state, metrics = step(state, mesh_lib.global_batch(next(batches), mesh))
        steps += 1
        if steps == 1:
            jax.block_until_ready(metrics["loss"])
            out["first_step_s"] = round(time.perf_counter() - begin, 1)  # With the compile.
            begin = time.perf_counter()
        if steps % 10 == 0:
            losses.append(float(metrics["loss"]))
    jax.block_until_ready(state.params)
    seconds = time.perf_counter() - begin
    out.update(steps=steps, seconds=round(seconds, 1), loss_every_10_steps=losses[-20:],
               tokens_trained=steps * train.global_batch_size * train.seq_len,
               tokens_per_s=(steps - 1) * train.global_batch_size * train.seq_len
               / max(seconds, 1e-9))
    out["validation_after"] = validation_loss(state.params)
    ctx["trained_params"] = state.params
    ctx["trained"] = True


def corpus_processor(args, ctx):
    """The embedded corpus's SentencePiece vocabulary (trained on first use, ~10 s)."""
    if "processor" not in ctx:
        from matlm.data import embedded_tokens, wikitext
        if args.wiki_dump is None and importlib.util.find_spec("gensim") is None:
            raise wikitext.WikiDumpNotFoundError(
                "no Wikipedia sample: gensim is not installed here and .gpu_carry/ holds no "
                "*.bz2; pass --wiki_dump=PATH (docs/gpu.md says what to carry)")
        model, _ = ctx["decode_shape"]
        ctx["processor"] = embedded_tokens.load_processor(
            model.vocab_size, cache=str(args.output / "vocab") if args.smoke else None,
            source=args.wiki_dump, max_articles=args.max_articles)
    return ctx["processor"]


def decode_setup(args, ctx):
    """(config, params, prompts, xl, s, mix) for decoding: the trained parameters (a fresh
    init if training did not finish), validation prompts of --prompt_tokens tokens."""
    import jax
    from matlm.data import embedded_tokens, vocabulary
    from matlm.decoding.kv_cache import decoding_form
    from matlm.model import init_params
    model, _ = ctx["decode_shape"]
    params = ctx.get("trained_params")
    if params is None:
        params = init_params(model, jax.random.key(0))
        ctx["trained_params"] = params
    # The unrolled layer form the cached path runs, converted once (not per call).
    params, model = decoding_form(params, model)
    processor = corpus_processor(args, ctx)
    texts = embedded_tokens.split_texts("validation", args.wiki_dump, args.max_articles)
    start = vocabulary.start_id(processor)
    prompts = []
    for text in texts:
        ids = processor.encode(text)
        if len(ids) >= args.prompt_tokens:
            prompts.append([start, *ids[:args.prompt_tokens - 1]])
        if len(prompts) == 17:
            break
    if len(prompts) < 2:
        raise ValueError(f"the validation split has {len(prompts)} articles of at least "
                         f"{args.prompt_tokens} tokens; decoding needs 2: lower --prompt_tokens")
    prompts = (prompts * 17)[:17]  # A small (smoke) split repeats its prompts.
    spec = model.granularities
    half = model.n_layers // 2
    mix = model.resolve_widths(",".join([spec.names[0]] * half
                                        + [spec.names[-2]] * (model.n_layers - half)))
    return model, params, prompts, spec.uniform(spec.names[-1]), spec.uniform(spec.names[0]), mix


def kv_cache_section(args, out: dict, deadline, ctx):
    """KV-cache tokens/s at batch 1 and 16 (XL and S) against the bandwidth limit, with
    the weights as stored (float32, what `matlm generate` loads), then XL at batch 1 with
    them cast once to the compute dtype (half the weight bytes per token)."""
    import jax
    import jax.numpy as jnp
    model, params, prompts, xl, s, _ = decode_setup(args, ctx)
    out.update(trained=ctx.get("trained", False), new_tokens=args.new_tokens,
               prompt_tokens=args.prompt_tokens, copy_bytes_per_s=ctx.get("copy_bw"), rows=[])
    compute = jax.tree.map(lambda x: x.astype(jnp.dtype(model.compute_dtype)), params)
    runs = [("XL", xl, 1, params), ("S", s, 1, params), ("XL", xl, 16, params),
            ("S", s, 16, params), ("XL", xl, 1, compute)]
    for name, widths, batch, weights in runs:
        need(deadline, f"KV cache {name} batch {batch}", 3)
        row = cached_decode_row(args, ctx, model, weights, prompts[1:], name, widths, batch)
        out["rows"].append(row)
        ctx["record"].write()


def cached_decode_row(args, ctx, model, params, prompts, name, widths, batch) -> dict:
    """One KV-cache measurement: `batch` prompts decoded together (after a compiling
    call), tokens/s, and the bytes one decoding step must read."""
    import jax
    from matlm.decoding import buckets, kv_cache
    from matlm.decoding.generate import generate
    from matlm.model.counting import param_count
    rows = (prompts[:batch] * batch)[:batch]
    run = lambda: generate(params, model, rows, widths=widths, max_new_tokens=args.new_tokens,
                           seed=1)
    run()  # Compiles.
    start = time.perf_counter()
    tokens = sum(len(o) for o in run())
    tokens_per_s = tokens / (time.perf_counter() - start)
    # Bytes per decoding step: every weight the submodel uses once (the tied table as the
    # output projection), and the whole cache of the batch's bucket.
    weight_bytes = param_count(model, widths) * max(x.dtype.itemsize
                                                    for x in jax.tree.leaves(params))
    cache_len = buckets.cache_buckets(None, args.prompt_tokens + args.new_tokens)
    cache = jax.eval_shape(lambda: kv_cache.init_cache(model, batch, cache_len))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    bandwidth = ctx.get("copy_bw")
    limit = batch * bandwidth / (weight_bytes + cache_bytes) if bandwidth else None
    return {"widths": name, "batch": batch,
            "weights": jax.tree.leaves(params)[0].dtype.name, "tokens_per_s": tokens_per_s,
            "bytes_per_step": weight_bytes + cache_bytes, "weight_bytes": weight_bytes,
            "cache_bytes": cache_bytes, "bandwidth_limit_tokens_per_s": limit,
            "of_limit": tokens_per_s / limit if limit else None}


def speculative_section(args, out: dict, deadline, ctx):
    """Speculative XL (batch 1) with S and Mix'n'Match drafts against KV-cache XL."""
    from benchmark_decode import extend_milliseconds as extend_ms
    from matlm.decoding.generate import generate
    from matlm.decoding.speculative import speculative_generate
    model, params, prompts, xl, s, mix = decode_setup(args, ctx)
    warm, prompts = prompts[0], prompts[1:1 + args.spec_prompts]
    new = args.new_tokens
    ks = (2,) if args.smoke else (2, 4, 8)
    out.update(trained=ctx.get("trained", False), prompts=len(prompts), new_tokens=new,
               mix=",".join(model.granularities.name_of([w]) for w in mix), rows=[])
    generate(params, model, [warm], widths=xl, max_new_tokens=new, seed=1)
    start = time.perf_counter()
    xl_outputs = [generate(params, model, [p], widths=xl, max_new_tokens=new, seed=1)[0]
                  for p in prompts]
    xl_tps = sum(map(len, xl_outputs)) / (time.perf_counter() - start)
    out["cached_xl_tokens_per_s"] = xl_tps
    # The cost model's unit: one K-token extend at mid-generation cache depth.
    cache_len = args.prompt_tokens + new + max(ks) + 1
    depth = args.prompt_tokens + new // 2
    need(deadline, "the cost model's extend timings", 5)
    ms = {("XL", K): extend_ms(params, model, xl, K, cache_len, depth)
          for K in sorted({1, *(k + 1 for k in ks)})}
    for name, widths in (("S", s), ("mix", mix)):
        ms[(name, 1)] = extend_ms(params, model, widths, 1, cache_len, depth)
    out["extend_ms"] = {f"{n} K={K}": v for (n, K), v in ms.items()}
    cost = {n: ms[(n, 1)] / ms[("XL", 1)] for n in ("S", "mix")}
    out["draft_cost_over_target"] = cost
    out["verify_cost_over_one_token"] = {str(k): ms[("XL", k + 1)] / ms[("XL", 1)] for k in ks}
    ctx["record"].write()
    # Most telling first, so a short budget still yields a comparison.
    order = [(d, k, sh) for k in (4, 2, 8) if k in ks for d in ("S", "mix")
             for sh in (False, True)]
    for draft, k, shared in order:
        need(deadline, f"speculative {draft} k={k}", 3)
        widths = s if draft == "S" else mix

        def decode(p):
            return speculative_generate(params, model, [p], target_widths=xl,
                                        draft_widths=widths, draft_tokens=k,
                                        max_new_tokens=new, seed=1, shared_cache=shared)
        decode(warm)
        start = time.perf_counter()
        results = [decode(p) for p in prompts]
        seconds = time.perf_counter() - start
        stats = [st for _, st in results]
        tokens = sum(st.new_tokens for st in stats)
        alpha = sum(st.accepted for st in stats) / max(1, sum(st.drafted for st in stats))
        # Tokens per round over a round's cost in one-token XL extends: k (shared cache)
        # or k + 1 one-token draft extends, and one (k+1)-token verify.
        round_cost = (k if shared else k + 1) * cost[draft] + ms[("XL", k + 1)] / ms[("XL", 1)]
        per_round = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
        out["rows"].append({
            "draft": draft, "k": k, "shared_cache": shared, "acceptance": alpha,
            "tokens_per_s": tokens / seconds, "speedup_over_cached_xl": tokens / seconds / xl_tps,
            "predicted_speedup": per_round / round_cost, "round_cost_in_xl_tokens": round_cost,
            "tokens_per_round": per_round,
            "greedy_equals_xl": [o[0] for o, _ in results] == xl_outputs})
        ctx["record"].write()
    if out["rows"]:
        best = max(out["rows"], key=lambda r: r["speedup_over_cached_xl"])
        out["best"] = {k: best[k] for k in ("draft", "k", "shared_cache",
                                            "speedup_over_cached_xl")}


# ---- the report ------------------------------------------------------------------------

def _fmt(x, spec=".3g"):
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format(x, spec)
    return str(x)


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(data: dict) -> str:
    s = data["sections"]
    env = s.get("environment", {})
    lines = ["# matlm GPU check", "",
             f"device {env.get('device')} ({env.get('platform')}), jax {env.get('jax')}, "
             f"{env.get('date')}; command: `{env.get('command')}`; "
             f"{data.get('elapsed_s')} s in all", "",
             "## Sections", "",
             _table(["section", "status", "seconds", "note"],
                    [[n, v.get("status"), v.get("seconds"), v.get("reason") or v.get("error")
                      or ""] for n, v in s.items()]), ""]
    t = s.get("tests", {})
    lines += ["## Device tests", "", _table(["test", "outcome", "seconds", "message"],
                                             [[c["test"], c["outcome"], c["seconds"],
                                               c["message"][:80]] for c in t.get("cases", [])]),
              ""]
    m = s.get("compile_memory", {})
    lines += ["## Predicted vs measured memory (one train step)", "",
              _table(["shape", "batch", "predicted peak (GiB)", "measured peak (GiB)",
                      "measured / predicted", "device limit (GiB)"],
                     [[m.get("shape"), m.get("batch"), _gib(m.get("predicted_peak_bytes")),
                       _gib(m.get("measured_peak_bytes")), m.get("measured_over_predicted"),
                       _gib(m.get("device_memory_limit"))]]), ""]
    if m.get("measured_reason"):
        lines += [f"measured: {m['measured_reason']}", ""]
    p = s.get("peaks", {})
    lines += ["## Ceilings", "",
              _table(["figure", "value"],
                     [["data-sheet bf16 peak (TFLOP/s)", _tera(env.get("datasheet_peak_flops"))],
                      [f"measured {p.get('matmul_n')}³ {p.get('matmul_dtype')} matmul (TFLOP/s)",
                       _tera(p.get("matmul_flops"))],
                      ["measured copy (TB/s, read + written)", _tera(p.get("copy_bytes_per_s"))]]),
              ""]
    f = s.get("train_mfu", {})
    lines += ["## Train step (bf16)", "",
              _table(["shape", "variant", "batch × seq", "attention", "step (ms)", "tokens/s",
                      "MFU (data sheet)", "MFU (measured matmul)", "note"],
                     [[r["shape"], r["variant"], f"{r['batch']}×{r['seq_len']}", r["attention"],
                       _ms(r.get("step_s")), _fmt(r.get("tokens_per_s"), ",.0f"),
                       _pct(r.get("mfu_datasheet")), _pct(r.get("mfu_measured_matmul")),
                       r.get("error", "")] for r in f.get("rows", [])]), ""]
    if f.get("trace"):
        lines += ["Costliest ops of one joint step (`--trace`; trace.tar.gz):", "",
                  _table(["op", "ms", "share"], [[n, ms, _pct(share)]
                                                 for n, ms, share in f["trace"]["top_ops"]]),
                  ""]
    tr = s.get("training", {})
    before, after = tr.get("validation_before", {}), tr.get("validation_after", {})
    lines += ["## Training before decoding", "",
              f"{tr.get('steps')} steps in {tr.get('seconds')} s "
              f"({_fmt(tr.get('tokens_per_s'), ',.0f')} tokens/s), "
              f"{_fmt(tr.get('tokens_trained'), ',')} tokens", "",
              _table(["metric", "before", "after"],
                     [[k, before.get(k), after.get(k)] for k in sorted(after)]), ""]
    kv = s.get("kv_cache", {})
    lines += ["## KV-cache decoding", "",
              _table(["widths", "batch", "weights", "tokens/s", "bandwidth limit (tokens/s)",
                      "of limit", "MB read per step"],
                     [[r["widths"], r["batch"], r["weights"], _fmt(r["tokens_per_s"], ",.1f"),
                       _fmt(r["bandwidth_limit_tokens_per_s"], ",.1f"), _pct(r["of_limit"]),
                       _fmt(r["bytes_per_step"] / 1e6, ",.1f")] for r in kv.get("rows", [])]),
              ""]
    sp = s.get("speculative", {})
    lines += ["## Speculative decoding (batch 1)", "",
              f"KV-cache XL: {_fmt(sp.get('cached_xl_tokens_per_s'), ',.1f')} tokens/s; "
              f"draft cost / target cost: {_dict(sp.get('draft_cost_over_target'))}; "
              f"verify cost / one-token cost by k: {_dict(sp.get('verify_cost_over_one_token'))}",
              "",
              _table(["draft", "k", "shared cache", "acceptance", "tokens/s",
                      "speed-up vs KV-cache XL", "cost model", "greedy = XL"],
                     [[r["draft"], r["k"], r["shared_cache"], _fmt(r["acceptance"]),
                       _fmt(r["tokens_per_s"], ",.1f"), _fmt(r["speedup_over_cached_xl"]),
                       _fmt(r["predicted_speedup"]), r["greedy_equals_xl"]]
                      for r in sp.get("rows", [])]), ""]
    return "\n".join(lines)


def _gib(n):
    return None if n is None else round(n / 2 ** 30, 3)


def _tera(x):
    return None if x is None else round(x / 1e12, 3)


def _ms(x):
    return None if x is None else round(x * 1e3, 1)


def _pct(x):
    return "—" if x is None else f"{x:.1%}"


def _dict(d):
    return ", ".join(f"{k} {v:.3g}" for k, v in (d or {}).items()) or "—"


# ---- main ------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path,
                        help="directory for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, CPU, the whole check in under a minute")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="seconds for everything (default 420; smoke 90, a cap: it takes "
                             "about 50): each section "
                             "gets a share, unused time passes on")
    parser.add_argument("--sections", default=None,
                        help="comma-separated sections to run (default: all); the others are "
                             "recorded as not selected. The decoding sections decode a fresh "
                             "init unless 'training' runs too")
    parser.add_argument("--platform", default=None,
                        help="JAX_PLATFORMS for the device tests (default: cuda, smoke: cpu)")
    parser.add_argument("--batch_180m", type=int, default=16)
    parser.add_argument("--batch_850m", type=int, default=8)
    parser.add_argument("--remat", default="dots_saveable")
    parser.add_argument("--attention_impl", default="auto")
    parser.add_argument("--mfu_steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--trace", action="store_true",
                        help="also write trace.tar.gz: a jax.profiler trace of one joint step "
                             "(the first shape; TensorBoard's profile plugin or xprof reads it)")
    parser.add_argument("--train_s", type=float, default=None,
                        help="seconds of training before decoding (default 120; smoke 3)")
    parser.add_argument("--decode_vocab", type=int, default=8192,
                        help="vocabulary of the trained decoding model (the embedded one)")
    parser.add_argument("--prompt_tokens", type=int, default=None)
    parser.add_argument("--new_tokens", type=int, default=None)
    parser.add_argument("--spec_prompts", type=int, default=None)
    parser.add_argument("--wiki_dump", default=None,
                        help="the Wikipedia sample (.xml.bz2); default: gensim's, else "
                             ".gpu_carry/*.bz2 (docs/gpu.md)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    # Smoke: the first articles only (parsing all of them takes 10+ s on a small CPU).
    args.max_articles = 30 if smoke else None
    defaults = dict(budget_s=90 if smoke else 420, platform="cpu" if smoke else "cuda",
                    mfu_steps=1 if smoke else 4, train_s=2 if smoke else 120,
                    prompt_tokens=16 if smoke else 64, new_tokens=8 if smoke else 128,
                    spec_prompts=1 if smoke else 4)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.wiki_dump is None and importlib.util.find_spec("gensim") is None:
        carried = sorted((REPO / ".gpu_carry").glob("*.bz2"))
        if carried:
            args.wiki_dump = str(carried[0])
    if args.sections:
        args.sections = [n.strip() for n in args.sections.split(",") if n.strip()]
        unknown = sorted(set(args.sections) - set(SECTIONS))
        if unknown:
            parser.error(f"--sections: unknown {', '.join(unknown)}; known: "
                         f"{', '.join(SECTIONS)}")
    for name in ("budget_s", "train_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:  # Before JAX starts: most of the GPU for this process (JAX's default is 75 %).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    args.output.mkdir(parents=True, exist_ok=True)
    record = Record(args.output, args.budget_s, SMOKE_SECTIONS if args.smoke else SECTIONS)
    ctx = {"record": record, "compiled": {}}

    def setup():
        import jax
        import numpy as np
        from matlm.model.attention import resolve_impl
        from matlm.training import mesh as mesh_lib
        from matlm.training.config import TrainConfig
        ctx["mesh"] = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        ctx["attention_impl"] = resolve_impl
        ctx["shapes"] = shapes(args)

        def synthetic_batch(model, train):
            rng = np.random.default_rng(0)
            B, T = train.global_batch_size, train.seq_len
            tokens = rng.integers(0, model.vocab_size, (B, T + 1)).astype(np.int32)
            return mesh_lib.global_batch({
                "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "segment_ids": np.ones((B, T), np.int32),
                "positions": np.tile(np.arange(T), (B, 1)).astype(np.int32),
                "loss_mask": np.ones((B, T), np.float32)}, ctx["mesh"])
        ctx["synthetic_batch"] = synthetic_batch
        model, _ = ctx["shapes"]["smoke" if args.smoke else "850m"]
        vocab = 512 if args.smoke else args.decode_vocab
        decode_model = dataclasses.replace(model, vocab_size=vocab)
        seq = 128 if args.smoke else 1024
        ctx["decode_shape"] = (decode_model, TrainConfig(
            seq_len=seq, global_batch_size=4 if args.smoke else 16, mesh_shape=(1, 1, 1),
            steps=100000, warmup_steps=5 if args.smoke else 30, decay="constant",
            learning_rate=1e-3, loss_chunk_size=0 if args.smoke else 512))
        # Time kept back from training for the decoding sections.
        ctx["reserve_after_training"] = 0.0

    runners = {"environment": environment, "tests": run_tests}
    steps = {"compile_memory": compile_memory, "peaks": peaks, "train_mfu": train_mfu,
             "training": training, "kv_cache": kv_cache_section,
             "speculative": speculative_section}
    failed = False
    for name in SECTIONS:
        deadline = record.deadline(name)
        out = record.section(name)
        if args.sections and name not in args.sections and name != "environment":
            out["status"] = "not selected"
            record.write()
            continue
        out["status"] = "running"
        start = time.perf_counter()
        try:
            if name in runners:
                runners[name](args, out, deadline)
                if name == "environment":
                    ctx["environment"] = out
                    setup()
            else:
                steps[name](args, out, deadline, ctx)
            if out["status"] == "running":
                out["status"] = "ok"
        except OutOfTime as e:
            out.update(status="partial", reason=str(e))
        except Exception as e:  # Recorded; the next section still runs.
            failed = True
            out.update(status="error", error=error_summary(e, 300),
                       traceback=traceback.format_exc()[-3000:])
        out["seconds"] = round(time.perf_counter() - start, 1)
        out["budget_until_s"] = round(deadline - record.start, 1)
        record.write()
        print(f"[gpu_check] {name}: {out['status']} in {out['seconds']} s"
              + (f" ({out.get('error') or out.get('reason')})"
                 if out["status"] not in ("ok",) else ""), flush=True)
    print(render_markdown(record.data))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
