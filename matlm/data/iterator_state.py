"""The check every batch iterator makes before it resumes from a saved state: the state was
written by the same kind of pipeline (its version) with the same config, apart from fields
that only say how hosts split a global batch. Shared by the text and image pipelines;
TensorFlow-free."""
from __future__ import annotations

import dataclasses
from typing import Any

from matlm.data.errors import StateError

# Config fields that do not change which examples make up a global batch.
HOST_LAYOUT_FIELDS = frozenset({"num_hosts"})


def check_state(state: dict[str, Any], config, version, what: str = "pipeline") -> None:
    """Raises StateError unless `state` has `version` and equals the dataclass `config` in
    every field but HOST_LAYOUT_FIELDS (`what` names the pipeline in the message)."""
    if state.get("version") != version:
        raise StateError(f"{what} state version {state.get('version')!r} is not {version!r}")
    current = dataclasses.asdict(config)
    differ = {k: (state.get(k), v) for k, v in current.items()
              if k not in HOST_LAYOUT_FIELDS and state.get(k) != v}
    if differ:
        raise StateError(f"saved {what} state does not match this pipeline "
                         f"(field: (saved, now)): {differ}")
