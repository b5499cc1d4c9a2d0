#!/usr/bin/env python
"""Benchmark: checkpoint save and restore, local disk against a GCS-protocol server.

Saves a training state of `--params` float32 parameters plus two Adam moments (the 78M
recipe's size by default: 3 × 78 M floats, 0.94 GB) through `RunCheckpointer` — the real
path: checksums, Orbax, TensorStore — to a local temporary dir and to gs:// on
fake-gcs-server on loopback (tests/gcs_emulator.py), and restores it with
`restore_latest` (checksums verified). Per target, best of `--repeats`:

- stall: how long `save()` blocks the training loop (checksums, device-to-host copy);
  the rest of an asynchronous save runs beside the next steps;
- save: until the save is complete (`wait()`), and its throughput;
- restore: `restore_latest` (read + checksum compare), and its throughput.

The emulator keeps objects in memory and runs on the same cores: its numbers measure the
client side (TensorStore's GCS requests, gcsfs), not Cloud Storage's bandwidth.

  python scripts/benchmark_checkpoint.py                   # 78 M parameters
  python scripts/benchmark_checkpoint.py --params 10e6     # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_state(num_params: int, arrays: int = 24):
    """params and Adam moments (mu, nu) of `num_params` float32 values in `arrays` arrays."""
    import jax
    import jax.numpy as jnp
    rows = max(1, num_params // (arrays * 1024))
    keys = jax.random.split(jax.random.key(0), arrays)
    params = {f"w{i}": jax.random.normal(k, (rows, 1024), jnp.float32)
              for i, k in enumerate(keys)}
    opt_state = {"mu": jax.tree.map(lambda x: x * 0.1, params),
                 "nu": jax.tree.map(lambda x: x * x, params)}
    return types.SimpleNamespace(params=params, opt_state=opt_state)


def abstract(state):
    import jax
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    as_abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    return types.SimpleNamespace(params=as_abstract(state.params),
                                 opt_state=as_abstract(state.opt_state))


def measure(where: str, state, repeats: int) -> dict:
    import jax
    from matlm.model_dir import RunCheckpointer
    nbytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    stall, save, restore = [], [], []
    for repeat in range(repeats):
        model_dir = f"{where}/run{repeat}"
        checkpointer = RunCheckpointer(model_dir, keep=1)
        start = time.perf_counter()
        checkpointer.save(1, state, {"epoch": 1}, {"step": 1})
        stall.append(time.perf_counter() - start)
        checkpointer.wait()
        save.append(time.perf_counter() - start)
        start = time.perf_counter()
        restored = RunCheckpointer(model_dir, keep=1).restore_latest(abstract(state))
        jax.block_until_ready(restored[:2])
        restore.append(time.perf_counter() - start)
        assert restored[-1] == 1
    mb = nbytes / 1e6
    return {"target": where.split("/run")[0] if where.startswith("gs://") else "local disk",
            "MB": round(mb), "stall_s": round(min(stall), 3), "save_s": round(min(save), 3),
            "save_MB_s": round(mb / min(save)), "restore_s": round(min(restore), 3),
            "restore_MB_s": round(mb / min(restore))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=78e6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import gcs_emulator
    state = make_state(int(args.params))
    from matlm.model_dir import integrity
    integrity.fingerprints({"params": state.params, "opt_state": state.opt_state})  # Compiles.
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure(tmp, state, args.repeats))
    with gcs_emulator.emulator() as server:
        gcs_emulator.point_clients_at(server)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        server.create_bucket(bucket)
        results.append(measure(f"gs://{bucket}", state, args.repeats))
    from tabulate import tabulate
    print(tabulate(results, headers="keys"))
    local, gcs = results
    print(json.dumps({"params": int(args.params), "results": results,
                      "restore_bucket_over_local": round(gcs["restore_s"] / local["restore_s"], 2),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
