"""`verify_checkpoint`: what `matlm verify` finds in one checkpoint. A reader: it moves and
writes nothing, and compares checksums whatever `integrity.VERIFY` says."""
from __future__ import annotations

import dataclasses

from matlm.model_dir.layout import as_model_dir
from matlm.model_dir.restore import UnreadableCheckpoint, restore_and_verify


@dataclasses.dataclass
class VerifyResult:
    """What `verify_checkpoint` found in one checkpoint."""
    step: int
    status: str  # "ok" | "CORRUPT" | "unreadable" | "unverified"
    arrays: int  # Arrays restored and compared.
    detail: str = ""


def verify_checkpoint(model_dir, step: int, params_target, opt_state_target=None
                      ) -> VerifyResult:
    """Restores one checkpoint onto the given targets (ShapeDtypeStructs with shardings;
    `opt_state_target=None` checks the parameters only) and compares it with its
    checksums."""
    model_dir = as_model_dir(model_dir)
    path = model_dir.checkpoint_path(step)
    targets = {"params": params_target}
    if opt_state_target is not None:
        targets["opt_state"] = opt_state_target
    try:
        restored = restore_and_verify(
            model_dir.checkpoint_manager(read_only=True, create=False), path, step, targets,
            json_items=("data", "meta"), optional=("opt_state", "data", "meta"),
            always_verify=True, warn_without_checksums=False)
    except UnreadableCheckpoint as e:
        return VerifyResult(step, "unreadable", 0, e.summary)
    count = restored.array_count
    skipped = "" if "opt_state" in restored.items or not (path / "opt_state").is_dir() else \
        "; opt_state not checked (no optimizer config)"
    if not restored.has_checksums:
        return VerifyResult(step, "unverified", count, "written without checksums" + skipped)
    if restored.problem is not None:
        return VerifyResult(step, "CORRUPT", count, f"{restored.problem}{skipped}")
    return VerifyResult(step, "ok", count, skipped.lstrip("; "))
