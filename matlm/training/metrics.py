"""Metric sinks (TensorBoard event files and metrics.jsonl, process 0 only) and MFU."""
from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from vendor data sheets.
KNOWN_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def measured_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    """This device's fp32 matmul rate (best of `reps`): the CPU's 'peak'."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops_per_device(configured: float | None) -> tuple[float, str]:
    """(FLOP/s, where the number comes from) for MFU."""
    if configured:
        return float(configured), "configured"
    kind = jax.devices()[0].device_kind
    for name, flops in KNOWN_PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{kind} bf16 data sheet"
    return measured_matmul_flops(), f"measured fp32 matmul on {kind}"


class MetricsWriter:
    """Writes scalars to TensorBoard and one JSON object per call to metrics.jsonl.

    The files are opened on the first write, so creating a writer touches nothing (the
    trainer builds it while it is still validating its inputs)."""

    def __init__(self, model_dir, enabled: bool = True):
        from matlm.training.model_dir import as_model_dir
        self.enabled = enabled
        self._model_dir = as_model_dir(model_dir)
        self._tb = self._jsonl = None

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            from tensorboardX import SummaryWriter  # Light: no TensorFlow needed.
            self._model_dir.path.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(self._model_dir.tensorboard))
            self._jsonl = open(self._model_dir.metrics_file, "a")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb = self._jsonl = None
