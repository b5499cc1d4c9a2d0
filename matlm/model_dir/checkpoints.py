"""`RunCheckpointer`: saves and restores a training run's state, setting aside a newest
checkpoint that is unreadable or corrupt (see the package docstring)."""
from __future__ import annotations

import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from matlm.messages import error_summary
from matlm.model_dir import integrity
from matlm.model_dir.errors import CheckpointError
from matlm.model_dir.layout import as_model_dir
from matlm.model_dir.restore import UnreadableCheckpoint, restore_and_verify


class RunCheckpointer:
    """Saves and restores a training run's state (see the package docstring)."""

    def __init__(self, model_dir, keep: int = 3, async_save: bool = True):
        self.model_dir = as_model_dir(model_dir)
        self.directory = self.model_dir.checkpoints
        self.manager = self.model_dir.checkpoint_manager(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        # The step `restore_latest` restored in this job (None: none, or a fresh start), so
        # that a failure right after a resume can point at the checkpoint it came from.
        self.restored_step: Optional[int] = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        if step in self.manager.all_steps():
            return  # Already saved (e.g. a final save right after a periodic one).
        # Checksums of the live state, dispatched now: after `save` returns the state is
        # donated to the next step. They go into `meta`, written in the same atomic save.
        meta = integrity.record(meta, {"params": state.params, "opt_state": state.opt_state},
                                data_state)
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state):
        """(params, opt_state, data_state, meta, step) of the newest checkpoint that
        restores and matches its checksums, or None when there is none. Unreadable or
        corrupt ones are moved aside."""
        for step in reversed(self.steps()):
            path = self.directory / str(step)
            if not any((path / item).is_dir() for item in ("opt_state", "data")):
                # A params-only checkpoint (`save_for_inference`, `matlm extract`): not a
                # broken run but a model to fine-tune; never moved aside. (A run's
                # checkpoint missing one of them is still restored below and set aside.)
                return self._restore_params_only(step, abstract_state.params)
            try:
                restored = restore_and_verify(
                    self.manager, path, step,
                    {"params": abstract_state.params, "opt_state": abstract_state.opt_state},
                    json_items=("data", "meta"))
            except Exception as e:  # Unreadable, or arrays the checksums cannot read.
                cause = e.error if isinstance(e, UnreadableCheckpoint) else e
                self._set_aside(step, error_summary(cause, 300))
                continue
            if restored.problem is not None:
                self._set_aside(step, error_summary(restored.problem, 300))
                continue
            self.restored_step = step
            items = restored.items
            return items["params"], items["opt_state"], items["data"], items["meta"], step
        return None

    def _restore_params_only(self, step: int, params_target):
        """(params, None, None, meta, step) of a params-only checkpoint: the trainer starts
        a fresh optimizer and data pipeline from these parameters (fine-tuning)."""
        path = self.directory / str(step)
        try:
            restored = restore_and_verify(self.manager, path, step, {"params": params_target},
                                          optional=("meta",))
        except UnreadableCheckpoint as e:
            raise CheckpointError(f"params-only checkpoint {path} could not be read "
                                  f"({e.summary}); does the model config match the one it "
                                  "was saved with?") from e.error
        if restored.problem is not None:
            raise CheckpointError(f"params-only checkpoint {path} is corrupt "
                                  f"({restored.problem})")
        self.restored_step = step
        return restored.items["params"], None, None, restored.items.get("meta"), step

    def _set_aside(self, step: int, detail: str) -> None:
        path = self.directory / str(step)
        target = path.with_name(f"{step}.corrupt")
        n = 1
        while target.exists():
            target, n = path.with_name(f"{step}.corrupt{n}"), n + 1
        if jax.process_index() == 0:
            os.rename(path, target)
        # One line for the user (a logging call as well printed it twice under absl).
        print(f"WARNING: checkpoint {path} is incomplete or corrupt ({detail}); "
              f"moved aside to {target.name}, trying the previous one")
        self.manager.reload()
