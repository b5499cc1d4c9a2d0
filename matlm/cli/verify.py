"""`matlm verify`: check a model dir's checkpoints against their checksums, without training.

    matlm verify --model_dir=runs/tiny            # every checkpoint
    matlm verify --model_dir=runs/tiny --step 40  # one

Each checkpoint is restored onto this host's first CPU device (parameters, and the
optimizer state rebuilt from the run's saved TrainConfig) and its per-array fingerprints
are compared with those recorded when it was written (matlm.model_dir.integrity). Prints a
table and a final JSON line. Exit 0: every checkpoint ok (or written before checksums
existed: "unverified"); 1: any corrupt or unreadable; 2: bad input (no such model dir or
step). A reader: takes no lock and never writes or moves anything, so it may run beside
a training job (a checkpoint that job is still writing is not listed yet).
"""
from __future__ import annotations

import json

from tabulate import tabulate

from matlm.cli import flags

PARENTS = [flags.model_dir(help="a model dir written by `matlm train`"),
           flags.step(help="check only this checkpoint (default: all of them)")]


def add_arguments(parser) -> None:
    pass  # Its flags are the shared ones (PARENTS).


def _targets(run_config):
    """(params target, opt_state target or None, note): abstract trees on one CPU device."""
    import flax.linen
    import jax

    from matlm.model import abstract_params
    from matlm.training import mesh as mesh_lib
    from matlm.model_dir import CheckpointError
    from matlm.training.optimizer import make_optimizer
    from matlm.training.train_step import abstract_state

    model_config = run_config.model
    # CPU, whatever the default backend: a verify beside a training job must not take
    # accelerator memory. One device: the fingerprint is sharding-agnostic.
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices("cpu")[:1])
    try:
        # The optimizer state's tree depends on the optimizer, built from the saved recipe.
        train_config, note = run_config.train, ""
    except CheckpointError as e:
        train_config, note = None, f"saved train config unusable ({e})"
    if train_config is None:
        # A params-only checkpoint (save_for_inference) or an unusable recipe: parameters.
        shapes = flax.linen.meta.unbox(abstract_params(model_config))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            shapes), None, note
    target = abstract_state(model_config, make_optimizer(train_config), mesh)
    return target.params, target.opt_state, note


def run(args, gin_bindings) -> int:
    from matlm.model_dir import CheckpointError, ModelDir, verify_checkpoint

    if gin_bindings:
        raise CheckpointError("matlm verify takes no --gin bindings: the model comes from "
                              "the model dir's run_config.json")
    from matlm.model_dir import storage
    model_dir = ModelDir(args.model_dir)
    storage.check_access(model_dir.path, write=False)  # gs://: the bucket, and listable.
    if not model_dir.path.is_dir():
        raise CheckpointError(f"--model_dir {args.model_dir!r} does not exist")
    run_config = model_dir.run_config()
    steps = model_dir.checkpoint_steps()
    set_aside = model_dir.set_aside_checkpoints()
    if args.step is not None:
        if args.step not in steps:
            raise CheckpointError(f"--step {args.step}: no checkpoint at that step in "
                                  f"{model_dir.checkpoints}; available: {steps}")
        steps = [args.step]
    elif not steps and not set_aside:
        raise CheckpointError(f"--model_dir {args.model_dir!r} holds no checkpoint under "
                              f"{model_dir.checkpoints}")

    params_target, opt_target, note = _targets(run_config)
    results = [verify_checkpoint(model_dir, step, params_target, opt_target) for step in steps]
    rows = [(r.step, r.arrays, r.status, r.detail) for r in results]
    if args.step is None:
        rows += [(p.name, "", "set aside earlier", "moved aside by a restore; not checked")
                 for p in set_aside]
    print(tabulate(rows, headers=["step", "arrays", "status", "detail"],
                   disable_numparse=True))
    if note:
        print(f"note: {note}; optimizer state not checked")
    bad = [r for r in results if r.status in ("CORRUPT", "unreadable")]
    by_status = {status: [r.step for r in results if r.status == status]
                 for status in ("ok", "CORRUPT", "unreadable", "unverified")}
    print(json.dumps({"model_dir": str(model_dir.path), "status": "corrupt" if bad else "ok",
                      "ok": by_status["ok"], "corrupt": by_status["CORRUPT"],
                      "unreadable": by_status["unreadable"],
                      "unverified": by_status["unverified"],
                      "set_aside": [p.name for p in set_aside]}))
    return 1 if bad else 0
