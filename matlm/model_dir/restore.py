"""The one restore-and-verify path: restore some items of one checkpoint, wrap whatever
Orbax raises into one CheckpointError, and compare the arrays with the checksums written
with them (`matlm.model_dir.integrity`).

Its three callers differ only in what they do with the outcome: a training run moves a bad
checkpoint aside and tries the previous one (`RunCheckpointer`), the inference loader
refuses it (`load_checkpoint_for_inference`), and `matlm verify` reports it
(`verify_checkpoint`). None of that happens here: this module moves and writes nothing.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from matlm.messages import error_summary
from matlm.model_dir import integrity
from matlm.model_dir.errors import CheckpointError

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state")  # Restored onto targets and checksummed.
JSON_ITEMS = ("data", "meta")  # The data pipeline's state (checksummed) and metadata.


class UnreadableCheckpoint(CheckpointError):
    """Orbax could not restore the checkpoint (missing, truncated or mismatched files).
    `error` is what Orbax raised; `summary` quotes it in one line."""

    def __init__(self, path: Path, error: BaseException):
        # Orbax appends "See full TensorStore details: <bound method …>", a repr that
        # says nothing: the summary stops before it.
        summary = error_summary(error).split(". See full TensorStore details")[0]
        self.path, self.error, self.summary = path, error, summary
        super().__init__(f"checkpoint {path} could not be read ({self.summary})")


@dataclasses.dataclass
class Restored:
    """One restored checkpoint and what its checksums say about it."""
    path: Path
    items: dict[str, Any]  # Item name -> restored tree or JSON, for the items restored.
    has_checksums: bool  # False: written before checksums existed, nothing was compared.
    problem: Optional[integrity.IntegrityError]  # None: matches (or was not compared).

    @property
    def array_count(self) -> int:
        return len(jax.tree.leaves({k: v for k, v in self.items.items() if k in ARRAY_ITEMS}))


def _drops_io_noise(previous):
    """An unraisable-exception hook that drops what Orbax and TensorStore leave behind a
    failure matlm has already reported in one line, and passes anything else on:
    - a read coroutine abandoned when the restore of a corrupt or truncated checkpoint
      failed raises again while being closed (its exception caused by the GeneratorExit
      of the close): printed with the array's whole TensorStore spec, thousands of
      lines, at a moment the garbage collector picks;
    - TensorStore completing the other writes of a save that Orbax already gave up on
      finds Orbax's event loop closed ("Event loop is closed", once per pending write)."""
    def hook(unraisable):
        error = unraisable.exc_value
        abandoned = (inspect.iscoroutine(unraisable.object)
                     and isinstance(getattr(error, "__cause__", None), GeneratorExit))
        loop_gone = (unraisable.exc_type is RuntimeError
                     and str(error) == "Event loop is closed")
        if not (abandoned or loop_gone):
            previous(unraisable)
    hook.matlm_drops_io_noise = True
    return hook


def quiet_io_noise() -> None:
    """Installs `_drops_io_noise` as this process's unraisable-exception hook (once)."""
    if not getattr(sys.unraisablehook, "matlm_drops_io_noise", False):
        sys.unraisablehook = _drops_io_noise(sys.unraisablehook)


def restore_and_verify(manager: ocp.CheckpointManager, path: Path, step: int,
                       targets: Mapping[str, Any], json_items: Iterable[str] = ("meta",),
                       optional: Iterable[str] = (), always_verify: bool = False,
                       warn_without_checksums: bool = True) -> Restored:
    """Restores checkpoint `step` (at `path`): the array items in `targets` (item name ->
    tree of ShapeDtypeStructs with shardings) and the JSON items in `json_items`. Items
    named in `optional` are restored only where the checkpoint has them; any other item
    the checkpoint lacks makes it unreadable.

    Raises UnreadableCheckpoint where Orbax cannot restore it. A checkpoint whose
    contents do not match its checksums comes back with `problem` set. Checksums are
    compared unless `integrity.VERIFY` is off (`always_verify` compares them anyway); a
    checkpoint written without them restores with a one-line warning (unless
    `warn_without_checksums=False`).
    """
    quiet_io_noise()
    optional = set(optional)
    wanted = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    wanted.update({name: ocp.args.JsonRestore() for name in json_items})
    args = {name: arg for name, arg in wanted.items()
            if name not in optional or (path / name).is_dir()}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
        items = {name: restored[name] for name in args}
    except Exception as e:  # Orbax/TensorStore raise many kinds on bad files.
        raise UnreadableCheckpoint(path, e) from e
    meta = items.get("meta")
    if not integrity.has_checksums(meta):
        if warn_without_checksums:
            log.warning("checkpoint %s was written without checksums; not verified", path)
            print(f"WARNING: checkpoint {path} was written without checksums; not verified")
        return Restored(path, items, has_checksums=False, problem=None)
    arrays = {name: items[name] for name in ARRAY_ITEMS if name in items}
    problem = integrity.verify(meta, arrays, items.get("data"), force=always_verify)
    return Restored(path, items, has_checksums=True, problem=problem)
