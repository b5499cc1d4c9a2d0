"""What every step-addressed batch iterator shares (the text pipeline's in-memory path, the
offline and the TFDS image pipelines): the iterator protocol over a pure `batch(step)`,
its JSON `state`, the one-epoch batch count, and the check it makes before it resumes
from a saved state: written by the same kind of pipeline (its version) with the same
config, apart from fields that only say how hosts split a global batch. TensorFlow-free."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

from matlm.data.errors import BatchSizeError, DataError, StateError

# Config fields that do not change which examples make up a global batch.
HOST_LAYOUT_FIELDS = frozenset({"num_hosts"})


def check_host_layout(host_index: int, num_hosts: int, global_batch_size: int,
                      seed: int) -> None:
    """The checks every pipeline config makes of how hosts split its global batch (and of
    its seed): one-line BatchSizeError / DataError."""
    if num_hosts < 1 or not 0 <= host_index < num_hosts:
        raise BatchSizeError(f"host_index {host_index} is not in [0, num_hosts={num_hosts})")
    if global_batch_size < 1 or global_batch_size % num_hosts:
        raise BatchSizeError(
            f"global_batch_size {global_batch_size} must be positive and divisible "
            f"by the number of hosts ({num_hosts})")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")


def check_state(state: dict[str, Any], config, version, what: str = "pipeline") -> None:
    """Raises StateError unless `state` has `version` and equals the dataclass `config` in
    every field but HOST_LAYOUT_FIELDS (`what` names the pipeline in the message)."""
    if state.get("version") != version:
        raise StateError(f"{what} state version {state.get('version')!r} is not {version!r}")
    current = dataclasses.asdict(config)
    # Compared as JSON sees them: a saved state's lists are the config's tuples.
    differ = {k: (state.get(k), v) for k, v in current.items()
              if k not in HOST_LAYOUT_FIELDS and _as_json(state.get(k)) != _as_json(v)}
    if differ:
        raise StateError(f"saved {what} state does not match this pipeline "
                         f"(field: (saved, now)): {differ}")


def config_from_state(state: dict[str, Any], config_class, version, what: str,
                      num_hosts: int):
    """The `config_class` a saved state was written with, for this job's `num_hosts`
    (StateError for another pipeline's state, or one that lacks a field). JSON lists come
    back as tuples where the field's default or annotation is a tuple."""
    if state.get("version") != version:
        raise StateError(f"{what} state version {state.get('version')!r} is not {version!r}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    missing = sorted(set(fields) - set(state) - HOST_LAYOUT_FIELDS)
    if missing:
        raise StateError(f"{what} state lacks {missing}")
    values = {k: state[k] for k in fields if k in state}
    for name, value in values.items():
        if isinstance(value, list) and "tuple" in str(fields[name].type):
            values[name] = tuple(value)
    return config_class(**{**values, "num_hosts": num_hosts})


def _as_json(value):
    return json.loads(json.dumps(value))


def one_epoch_batches(num_examples: int, global_batch_size: int, repeat: bool,
                      pad_to_num_batches: int | None = None) -> int | None:
    """Global batches of one pass (None when repeating), padded up to `pad_to_num_batches`
    (so that several eval splits take the same number of collective steps)."""
    if repeat:
        return None
    batches = -(-num_examples // global_batch_size)
    if pad_to_num_batches is not None:
        if pad_to_num_batches < batches:
            raise DataError(f"pad_to_num_batches={pad_to_num_batches} is below this split's "
                            f"{batches} batches")
        batches = pad_to_num_batches
    return batches


class StepIterator:
    """The iterator protocol of a pipeline whose batch is a pure function of the step.

    A subclass sets STATE_VERSION and PIPELINE (its name in messages) and has `config` (a
    dataclass), `step`, `num_batches` (None: endless) and `batch(step)`. `state` is small,
    JSON-serialisable and the same on every host (the host index is not in it and
    `num_hosts` is informational: the order does not depend on it)."""

    STATE_VERSION: Any = None
    PIPELINE = "pipeline"

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self.step >= self.num_batches:
            raise StopIteration
        batch = self.batch(self.step)
        self.step += 1
        return batch

    @property
    def state(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, "step": int(self.step),
                **_as_json(dataclasses.asdict(self.config))}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to `state["step"]` after checking it was saved by the same pipeline."""
        check_state(state, self.config, self.STATE_VERSION, self.PIPELINE)
        self.step = int(state["step"])
