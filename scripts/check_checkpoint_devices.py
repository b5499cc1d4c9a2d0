"""Checkpoint checksums across devices: a checkpoint written on an accelerator must verify
on the CPU (`matlm verify` restores on the CPU) and vice versa, so the fingerprint of the
same values must be the same on every backend. Also times it against a synchronous save.

    python scripts/check_checkpoint_devices.py            # default backend vs CPU
    python scripts/check_checkpoint_devices.py --values=150e6

Prints a table (backend, seconds per fingerprint of the state, GB/s) and whether the
fingerprints agree; then saves a small train state with RunCheckpointer on the default
backend, restores it there and on the CPU, and reports both verifications. Exit 1 on
any disagreement.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tabulate import tabulate

from matlm.model import ModelConfig
from matlm.model_dir import RunCheckpointer, integrity
from matlm.training.config import TrainConfig
from matlm.training.mesh import make_mesh
from matlm.training.optimizer import make_optimizer
from matlm.training.train_step import abstract_state, init_state


def state_like(values: int, dtype) -> dict:
    """A params + two Adam moments tree of about `values` values (deterministic bits)."""
    n = int(values) // 3 // 20
    rows = max(n // 1000, 1)
    rng = np.random.default_rng(0)
    leaf = lambda: rng.standard_normal((rows, 1000), dtype=np.float32).astype(dtype)
    return {"params": {f"w{i}": leaf() for i in range(20)},
            "opt_state": {"mu": {f"w{i}": leaf() for i in range(20)},
                          "nu": {f"w{i}": leaf() for i in range(20)}}}


def timed_fingerprints(tree, device) -> tuple[dict, float]:
    on_device = jax.device_put(tree, device)
    integrity.fingerprints(on_device)  # Compile.
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        result = integrity.fingerprints(on_device)
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=float, default=150e6)
    args = parser.parse_args()
    default, cpu = jax.devices()[0], jax.devices("cpu")[0]
    ok = True
    rows = []
    for dtype in (np.float32, jnp.bfloat16):
        tree = state_like(args.values, dtype)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
        results = {}
        for device in dict.fromkeys([default, cpu]):
            results[device.platform], seconds = timed_fingerprints(tree, device)
            rows.append([device.platform, np.dtype(dtype).name, f"{nbytes / 1e9:.2f}",
                         f"{seconds:.4f}", f"{nbytes / seconds / 1e9:.1f}"])
        agree = len({json.dumps(r, sort_keys=True) for r in results.values()}) == 1
        ok &= agree
        rows[-1].append("agree" if agree else "DIFFER")
    print(tabulate(rows, headers=["backend", "dtype", "GB", "s per fingerprint", "GB/s",
                                  "across backends"]))

    # A small train state saved on the default backend, restored on it and on the CPU.
    model = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256)
    optimizer = make_optimizer(TrainConfig(steps=10))
    with tempfile.TemporaryDirectory() as tmp:
        mesh = make_mesh((1, 1, 1), [default])
        state = init_state(model, optimizer, mesh, seed=0)
        checkpointer = RunCheckpointer(tmp, async_save=False)
        checkpointer.save(1, state, {"task": "none"}, {"step": 1})
        checkpointer.wait()
        for device in dict.fromkeys([default, cpu]):
            target = abstract_state(model, optimizer, make_mesh((1, 1, 1), [device]))
            restored = RunCheckpointer(tmp).restore_latest(target)
            verified = restored is not None and restored[-1] == 1
            ok &= verified
            print(f"saved on {default.platform}, restored and verified on {device.platform}: "
                  f"{'ok' if verified else 'FAILED'}")
    print(json.dumps({"ok": bool(ok), "default_backend": default.platform,
                      "device_kind": default.device_kind}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
