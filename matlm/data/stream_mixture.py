"""Mixtures that include streamed tasks: exact rates per block, a global batch that is a
pure function of (seed, step) for any number of hosts, and an exact resume.

**Which task serves a row.** The same seeded block schedule as an in-memory mixture
(`matlm.data.mixture_schedule`, same seed key) over the global row index k = step·B + p:
row p of step s belongs to the task `locate(k)` names, so every block of
`MIX_BLOCK_ROWS` rows holds exactly each task's share.

**What the row is.** A streamed component keeps B streams (`streaming.Stream`), one per
batch position p, as a streamed task alone does; host h runs only its positions
[h·b, (h+1)·b). When the schedule gives row p of step s to streamed task t, the row is
the next row of stream (t, p): a stream advances only when it is chosen. So a row depends
only on (seed, step, p) and which earlier steps chose t at p, never on the host count.
Each streamed component's streams use their own seed key (seed, component index), so two
streamed components do not walk their files in the same order. An in-memory component
(e.g. `matlm_wiki`) is served as in an in-memory mixture: row `locate(k)`'s index of its
`task_rows.TaskRows` (a pure function of the step; same seed keys, so its rows are the
ones an in-memory mixture with the same components would give at the same places).

**State** (JSON, the same on every host): the step and, for every streamed component,
the positions of its B streams (gathered from all hosts), plus the mixture's components
and rates, checked again at restore so a mixture whose components changed is refused.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from matlm.data import corpora, packing, streaming, tasks, vocabulary
from matlm.data.errors import DataError, StateError
from matlm.data.mixture_schedule import MixtureSchedule
from matlm.data.seed_streams import SeedStream
from matlm.data.task_rows import TaskRows, token_store

STATE_VERSION = "stream-mix-1"
# The fields of a state that must equal the pipeline it is applied to (num_hosts may
# differ: the global batches do not depend on it).
_SAME_FIELDS = ("task", "split", "seq_len", "global_batch_size", "seed", "components")


def component_names_and_rates(mixture: str) -> list[list]:
    return [[task.name, rate] for task, rate in tasks.components(mixture)]


class StreamMixtureBatches:
    """Per-host batches of a mixture with streamed components: `next()`, `state`,
    `set_state`, `num_batches=None` (see the module docstring)."""

    def __init__(self, mixture: str, split: str, seq_len: int, global_batch_size: int,
                 vocab, seed: int, host_index: int = 0, num_hosts: int = 1,
                 start_step: int = 0, positions: Optional[list] = None):
        self.task, self.split, self.seq_len, self.seed = mixture, split, seq_len, seed
        self.global_batch_size, self.num_hosts, self.host_index = (
            global_batch_size, num_hosts, host_index)
        self.vocab = vocab
        self.components = component_names_and_rates(mixture)
        b = global_batch_size // num_hosts
        self.mine = range(host_index * b, (host_index + 1) * b)
        self.num_batches = None
        self._start_id = vocabulary.start_id(vocab)
        # The in-memory mixture's schedule and seed key (pipeline.BatchIterator).
        self._schedule = MixtureSchedule([r for _, r in self.components], (seed, 0, 1))
        # Component i: a list of this host's streams (streamed) or its TaskRows (in memory).
        self._rows: list = []
        for i, (name, _) in enumerate(self.components):
            if name in corpora.CORPORA:
                self._rows.append(None)  # Streams are made by _start_streams.
            else:  # The in-memory mixture's seed key for component i (pipeline.BatchIterator).
                store = token_store(tasks.get_task(name), split, vocab)
                self._rows.append(TaskRows(store, seq_len, (seed, i, 0, 1), True))
        self._start_streams(start_step, positions)

    def _start_streams(self, step: int, positions: Optional[list]) -> None:
        for i, (name, _) in enumerate(self.components):
            if name not in corpora.CORPORA:
                continue
            saved = positions[i] if positions is not None else None
            self._rows[i] = [
                streaming.Stream(corpora.CORPORA[name], self.split, p, self.global_batch_size,
                                 (self.seed, SeedStream.COMPONENT_STREAMS, i),
                                 self.seq_len, self.vocab,
                                 saved[p] if saved is not None else (0, 0, 0, 0))
                for p in self.mine]
        self.step = step

    def task_of_rows(self, step: int) -> np.ndarray:
        """The component index serving each of this host's rows at `step`."""
        return self._schedule.locate(self._global_rows(step))[0]

    def _global_rows(self, step: int) -> np.ndarray:
        return step * self.global_batch_size + np.asarray(self.mine, np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        task_of_row, index = self._schedule.locate(self._global_rows(self.step))
        rows = packing.empty_rows(len(self.mine), self.seq_len)
        for t, source in enumerate(self._rows):
            where = np.flatnonzero(task_of_row == t)
            if not len(where):
                continue
            if isinstance(source, list):  # Streamed: stream (t, p) gives its next row.
                got = [source[j].next_row() for j in where]
                got = {k: np.concatenate([g[k] for g in got]) for k in got[0]}
            else:
                got = source.rows(index[where])
            for name in rows:
                rows[name][where] = got[name]
        self.step += 1
        return packing.model_features(rows, self._start_id)

    def local_positions(self) -> np.ndarray:
        """[streamed components, this host's rows, 4] stream positions."""
        return np.asarray([[s.position for s in source] for source in self._rows
                           if isinstance(source, list)], np.int64).reshape(-1, len(self.mine), 4)

    @property
    def state(self) -> dict[str, Any]:
        """JSON; every streamed component's B stream positions (gathered from all hosts, a
        collective when there are several: call it on every host at the same step)."""
        mine = self.local_positions()
        if self.num_hosts > 1:
            from jax.experimental import multihost_utils
            every = np.asarray(multihost_utils.process_allgather(mine))  # [H, n, b, 4]
            mine = every.transpose(1, 0, 2, 3).reshape(len(mine), self.global_batch_size, 4)
        gathered = iter(mine.tolist())
        positions = [next(gathered) if isinstance(source, list) else None
                     for source in self._rows]
        return {"version": STATE_VERSION, "step": int(self.step), "task": self.task,
                "split": self.split, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "num_hosts": self.num_hosts, "components": self.components,
                "positions": positions}

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a saved state after checking it was saved by this same pipeline."""
        check_state(state)
        differ = {k: (state[k], getattr(self, k)) for k in _SAME_FIELDS
                  if state[k] != getattr(self, k)}
        if differ:
            raise StateError("saved stream-mixture state does not match this pipeline "
                             f"(field: (saved, now)): {differ}")
        self._start_streams(int(state["step"]), state["positions"])


def check_state(state: dict[str, Any]) -> None:
    """A saved state is this version's, its mixture is still registered with the same
    components and rates, and it has B positions for each streamed component."""
    if state.get("version") != STATE_VERSION:
        raise StateError(f"stream-mixture state version {state.get('version')!r} is not "
                         f"{STATE_VERSION}")
    now = component_names_and_rates(state["task"])
    saved = [list(c) for c in state["components"]]
    if now != saved:
        raise StateError(f"mixture {state['task']!r} changed since its state was saved: "
                         f"components and rates were {saved}, are now {now}; resume with "
                         "the original mixture or start a new run")
    for (name, _), positions in zip(saved, state["positions"]):
        if (positions is None) == (name in corpora.CORPORA):
            raise StateError(f"mixture {state['task']!r}: task {name!r} was "
                             f"{'in memory' if positions is None else 'streamed'} when the "
                             "state was saved and is not now; register it as it was")
        if positions is not None and len(positions) != state["global_batch_size"]:
            raise StateError(f"mixture {state['task']!r}: the saved state has "
                             f"{len(positions)} streams for {name!r}, the global batch "
                             f"{state['global_batch_size']} rows")


def make(mixture: str, split: str, seq_len: int, global_batch_size: int, vocab, seed: int,
         host_index: int, num_hosts: int) -> StreamMixtureBatches:
    for task, _ in tasks.components(mixture):
        tasks.check_split(task, split)
    return StreamMixtureBatches(mixture, split, seq_len, global_batch_size, vocab, seed,
                                host_index, num_hosts)


def restore(state: dict[str, Any], vocab, host_index: int = 0,
            num_hosts: int = 1) -> StreamMixtureBatches:
    check_state(state)
    if state["global_batch_size"] % num_hosts:
        raise DataError(f"global_batch_size {state['global_batch_size']} is not divisible by "
                        f"the number of hosts ({num_hosts})")
    return StreamMixtureBatches(state["task"], state["split"], state["seq_len"],
                                state["global_batch_size"], vocab, state["seed"], host_index,
                                num_hosts, start_step=int(state["step"]),
                                positions=state["positions"])
