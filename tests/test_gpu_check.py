"""scripts/gpu_check.py --smoke on CPU with TensorFlow, seqio, TFDS and gin hidden (the GPU
image has none of them): every section runs and records numbers, the markdown has every
table; and the gin-free recipe reader agrees with gin."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_no_tensorflow import HIDDEN, REPO, hidden_env

sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = hidden_env(tmp / "site", HIDDEN + ("gin",))
    env.pop("XLA_FLAGS", None)  # One CPU device, as on one GPU.
    # A generous cap: the smoke run takes about 50 s on 2 cores; a loaded CI machine must
    # not turn a slow section into a partial one.
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke",
                           f"--output={tmp / 'out'}", "--budget_s=400"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, tmp / "out"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def test_smoke_run_records_every_section_with_numbers(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    sections = data["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section)
    env = sections["environment"]
    assert env["tensorflow_importable"] is False and env["gin_importable"] is False
    # The device tests ran in a pytest subprocess: the cuDNN test skips on a CPU, the KV
    # cache test passes (the subprocess was hidden from TensorFlow too).
    outcomes = {c["test"].split("::")[-1]: c["outcome"] for c in sections["tests"]["cases"]}
    assert outcomes == {"test_cudnn_matches_xla_on_gpu": "skipped",
                        "test_prefill_then_single_steps_equal_full_recomputation[mha-full]":
                            "passed"}
    memory = sections["compile_memory"]
    assert _number(memory["predicted_peak_bytes"]) and memory["predicted_peak_bytes"] > 0
    # A CPU has no allocator statistics; a GPU run must measure.
    assert memory["measured_peak_bytes"] is None and "no memory_stats" in memory["measured_reason"]
    peaks = sections["peaks"]
    assert peaks["matmul_flops"] > 0 and peaks["copy_bytes_per_s"] > 0
    rows = sections["train_mfu"]["rows"]
    assert [r["variant"] for r in rows] == ["joint", "xl_only", "masked_joint", "dense"]
    for r in rows:
        assert "error" not in r, r
        assert all(_number(r[k]) and r[k] > 0 for k in ("tokens_per_s", "mfu_datasheet",
                                                         "mfu_measured_matmul", "step_s"))
        # MFU is the executed FLOPs over the peak: recomputed here from the parts.
        achieved = r["flops_per_token"] * r["batch"] * r["seq_len"] / r["step_s"]
        assert r["mfu_datasheet"] == pytest.approx(achieved / env["datasheet_peak_flops"])
    by = {r["variant"]: r for r in rows}
    # The joint step runs four granularities: more FLOPs per token than XL alone, and
    # fewer than four whole passes (masked).
    assert by["xl_only"]["flops_per_token"] < by["joint"]["flops_per_token"] \
        < by["masked_joint"]["flops_per_token"] == 4 * by["xl_only"]["flops_per_token"]
    training = sections["training"]
    assert training["steps"] >= 1 and training["tokens_per_s"] > 0
    assert set(training["validation_after"]) == {"S", "M", "L", "XL"}
    kv = sections["kv_cache"]["rows"]
    assert [(r["widths"], r["batch"], r["weights"]) for r in kv] == [
        ("XL", 1, "float32"), ("S", 1, "float32"), ("XL", 16, "float32"), ("S", 16, "float32"),
        ("XL", 1, "float32")]  # Smoke computes in float32: the "cast" row casts to it.
    # Weight bytes are the submodel's parameters as stored: S reads fewer than XL.
    assert kv[1]["weight_bytes"] < kv[0]["weight_bytes"] == kv[2]["weight_bytes"]
    assert kv[2]["cache_bytes"] == 16 * kv[0]["cache_bytes"]
    for r in kv:
        assert r["tokens_per_s"] > 0 and r["bandwidth_limit_tokens_per_s"] > 0
        assert r["bytes_per_step"] == r["weight_bytes"] + r["cache_bytes"]
    spec = sections["speculative"]
    assert {(r["draft"], r["shared_cache"]) for r in spec["rows"]} == {
        ("S", False), ("S", True), ("mix", False), ("mix", True)}
    for r in spec["rows"]:
        assert 0 <= r["acceptance"] <= 1 and r["tokens_per_s"] > 0
        assert _number(r["predicted_speedup"]) and r["greedy_equals_xl"] is True
    assert 0 < spec["draft_cost_over_target"]["S"] and spec["verify_cost_over_one_token"]["2"] > 0


def test_smoke_markdown_has_every_table(smoke):
    _, out = smoke
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Device tests", "## Predicted vs measured memory", "## Ceilings",
                    "## Train step (bf16)", "## Training before decoding",
                    "## KV-cache decoding", "## Speculative decoding"):
        assert heading in md
        table = md.split(heading, 1)[1].split("\n## ", 1)[0]
        body = [line for line in table.splitlines() if line.startswith("| ")][1:]
        assert body, f"{heading}: no table rows"
    assert "| joint |" in md and "| dense |" in md


def test_recipe_reader_agrees_with_gin():
    pytest.importorskip("seqio")  # The recipes include a data gin that names text tasks.
    gin_config = pytest.importorskip("matlm.gin_config")
    for recipe in gpu_check.RECIPES.values():
        gin_config.parse_gin([recipe], [])
        model, train = gin_config.model_config_from_gin(), gin_config.train_config_from_gin()
        assert gpu_check.recipe_configs(recipe) == (model, train)


def test_recipe_reader_refuses_what_it_cannot_read(tmp_path):
    path = tmp_path / "r.gin"
    path.write_text("ModelConfig.d_model = %MACRO\n")
    with pytest.raises(ValueError, match="cannot read .* without gin"):
        gpu_check.recipe_bindings(path)


def test_top_ops_sums_device_kernels_by_name(tmp_path):
    import gzip
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {"ph": "M", "name": "process_name", "pid": 2,
               "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "name": "PjitFunction", "dur": 9000},
              {"ph": "X", "pid": 2, "name": "gemm", "dur": 3000},
              {"ph": "X", "pid": 2, "name": "cudnn_fmha", "dur": 2500},
              {"ph": "X", "pid": 2, "name": "gemm", "dur": 1000},
              {"ph": "i", "pid": 2, "name": "marker"}]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    # The host's events are left out where the device has kernels.
    assert gpu_check.top_ops(path) == [("gemm", 4.0, round(4 / 6.5, 4)),
                                       ("cudnn_fmha", 2.5, round(2.5 / 6.5, 4))]


def test_section_shares_split_the_whole_budget_in_one_order():
    for shares in (gpu_check.SECTIONS, gpu_check.SMOKE_SECTIONS):
        assert sum(shares.values()) == pytest.approx(1.0)
    assert list(gpu_check.SECTIONS) == list(gpu_check.SMOKE_SECTIONS)
    assert list(gpu_check.SECTIONS)[0] == "tests"  # Before this process takes the GPU.


def test_tests_past_their_budget_keep_the_outcomes_that_finished(tmp_path, monkeypatch):
    """The device tests' pytest is interrupted at the deadline, not killed: the junit XML
    still holds what finished, and the test it stopped is named as interrupted."""
    import time as time_lib
    tests_file = tmp_path / "test_budget.py"
    tests_file.write_text("import time\n\ndef test_quick():\n    pass\n\n"
                          "def test_slow():\n    time.sleep(60)\n")
    monkeypatch.setattr(gpu_check, "SMOKE_TESTS",
                        (f"{tests_file}::test_quick", f"{tests_file}::test_slow"))
    args = gpu_check.parse_args(["--smoke", f"--output={tmp_path / 'out'}"])
    args.output.mkdir()
    out = {}
    start = time_lib.perf_counter()
    with pytest.raises(gpu_check.OutOfTime, match="past their budget"):
        gpu_check.run_tests(args, out, deadline=time_lib.perf_counter() + 8)
    assert time_lib.perf_counter() - start < 40  # Not the sleeping test's 60 s.
    assert [(c["test"].split("::")[-1], c["outcome"]) for c in out["cases"]] == [
        ("test_quick", "passed"), ("(stopped by the time limit)", "interrupted")]
    assert out["counts"]["passed"] == 1 and out["counts"]["interrupted"] == 1
