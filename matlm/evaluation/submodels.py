"""Which submodels to evaluate: granularities, width vectors, Mix'n'Match presets.

Everything is resolved and validated against the checkpoint's ModelConfig before any
model work; a bad entry raises SubmodelError naming it and the model's granularities.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from matlm.evaluation.errors import SubmodelError
from matlm.model import ModelConfig
from matlm.model.counting import non_embedding_param_count, param_count

MIXNMATCH_PRESET = "mixnmatch"  # "mixnmatch:N[:SEED]": N seeded random per-layer mixes.


@dataclasses.dataclass(frozen=True)
class Submodel:
    name: str
    widths: tuple
    params: int
    non_embedding_params: int


def _make(config: ModelConfig, name: str, widths: Sequence[int]) -> Submodel:
    widths = tuple(int(w) for w in widths)
    return Submodel(name, widths, param_count(config, widths),
                    non_embedding_param_count(config, widths))


def mixnmatch_vectors(config: ModelConfig, count: int, seed: int = 0) -> list[tuple]:
    """`count` distinct non-uniform per-layer granularity mixes, drawn with `seed`."""
    spec = config.granularities
    if len(spec.widths) < 2 or config.n_layers < 2:
        raise SubmodelError("Mix'n'Match needs at least 2 granularities and 2 layers")
    rng = np.random.default_rng(seed)
    out: list[tuple] = []
    limit = len(spec.widths) ** config.n_layers - len(spec.widths)
    if count > limit:
        raise SubmodelError(f"only {limit} non-uniform Mix'n'Match vectors exist; asked {count}")
    while len(out) < count:
        widths = tuple(int(w) for w in rng.choice(spec.widths, size=config.n_layers))
        if len(set(widths)) > 1 and widths not in out:
            out.append(widths)
    return out


def _label(config: ModelConfig, widths: tuple) -> str:
    name = config.granularities.name_of(widths)
    return name if "," not in name or config.n_layers <= 8 else None


def resolve_submodels(config: ModelConfig, granularities: Sequence[str] | None = None,
                      widths: Sequence[str] = (), reference: str | None = None
                      ) -> tuple[list[Submodel], str]:
    """(submodels in evaluation order, name of the reference submodel).

    `granularities`: names (default: all of the model's). `widths`: each a granularity
    name, an integer, a comma-separated per-layer list, or `mixnmatch:N[:SEED]`.
    `reference` (default the largest granularity) is added if not listed.
    """
    spec = config.granularities
    where = (f"the checkpoint's model has {config.n_layers} layers and granularities "
             f"{', '.join(f'{n}={w}' for n, w in spec.by_name.items())}")
    chosen: list[Submodel] = []

    def add(name, vector):
        if all(s.widths != vector for s in chosen):
            chosen.append(_make(config, name, vector))

    for name in (spec.names if granularities is None else granularities):
        if name not in spec.by_name:
            raise SubmodelError(f"unknown granularity {name!r}: {where}")
        add(name, spec.uniform(name))
    mix_count = 0
    for entry in widths:
        if entry.startswith(MIXNMATCH_PRESET):
            parts = entry.split(":")
            try:
                count = int(parts[1])
                seed = int(parts[2]) if len(parts) > 2 else 0
            except (IndexError, ValueError):
                raise SubmodelError(f"bad preset {entry!r}: write mixnmatch:N or "
                                    "mixnmatch:N:SEED") from None
            vectors = mixnmatch_vectors(config, count, seed)
        else:
            try:
                vectors = [config.resolve_widths(entry)]
            except ValueError as e:
                raise SubmodelError(f"--widths={entry!r} is invalid for this checkpoint: {e} "
                                    f"({where})") from None
        for vector in vectors:
            label = _label(config, vector)
            if label is None:
                mix_count += 1
                label = f"mix{mix_count}"
            add(label, vector)
    if not chosen:
        raise SubmodelError("no submodels to evaluate")
    reference = reference or spec.names[-1]
    if all(s.name != reference for s in chosen):
        try:
            add(reference, config.resolve_widths(reference))
        except ValueError as e:
            raise SubmodelError(f"reference submodel {reference!r} is invalid: {e}") from None
    return chosen, reference
