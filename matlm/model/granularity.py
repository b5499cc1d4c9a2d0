"""Granularities (S, M, L, XL) and Mix'n'Match per-layer width vectors.

A *width vector* is a tuple with one FFN hidden width per layer. Granularity `i`
uses the first `m_i` hidden units of every FFN; a Mix'n'Match model picks a
granularity (or any valid width) per layer. Everything here is plain Python and is
validated before any tracing or compiling happens.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

WidthsLike = Union[str, int, Sequence[Union[str, int]]]


class GranularityError(ValueError):
    """An invalid granularity list or width vector."""


def default_widths(d_ff: int, num: int) -> tuple[int, ...]:
    """The paper's halving ladder: d_ff/2^(g-1), ..., d_ff/2, d_ff."""
    return tuple(d_ff // 2 ** (num - 1 - i) for i in range(num))


@dataclasses.dataclass(frozen=True)
class GranularitySpec:
    """Named nested FFN widths `m_1 < ... < m_g = d_ff` for a model with `n_layers` layers."""

    d_ff: int
    n_layers: int
    names: tuple[str, ...] = ("S", "M", "L", "XL")
    widths: tuple[int, ...] = ()
    alignment: int = 1
    nest_blocks: int = 1  # Widths must split evenly over the FFN's nesting blocks.
    # An extracted model (ModelConfig.layer_d_ff) stores fewer units in some layers: a
    # *named* granularity uses min(m, cap) there, i.e. the parent's granularity as far as
    # the extraction kept it (the prefix is still nested). () = every layer stores d_ff.
    layer_caps: tuple[int, ...] = ()

    def __post_init__(self):
        names = tuple(self.names)
        widths = tuple(self.widths) or default_widths(self.d_ff, len(names))
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "widths", widths)
        if not names:
            raise GranularityError("at least one granularity is required")
        if len(set(names)) != len(names):
            raise GranularityError(f"granularity names must be unique, got {names}")
        if len(names) != len(widths):
            raise GranularityError(
                f"{len(names)} granularity names {names} but {len(widths)} widths {widths}")
        for name, w in zip(names, widths):
            self.check_width(w, what=f"granularity {name!r}")
        if any(b <= a for a, b in zip(widths, widths[1:])):
            raise GranularityError(
                f"granularity widths must be strictly increasing (nested), got {widths}")
        if widths[-1] != self.d_ff:
            raise GranularityError(
                f"the largest granularity must use the full FFN: widths end at {widths[-1]}, "
                f"d_ff is {self.d_ff}")

    @property
    def by_name(self) -> dict[str, int]:
        return dict(zip(self.names, self.widths))

    def check_width(self, width: int, what: str = "width") -> int:
        if isinstance(width, bool) or not isinstance(width, int):
            raise GranularityError(f"{what}: width must be an integer, got {width!r}")
        if width <= 0:
            raise GranularityError(f"{what}: width {width} must be positive")
        if width > self.d_ff:
            raise GranularityError(f"{what}: width {width} exceeds d_ff={self.d_ff}")
        if width % self.alignment:
            raise GranularityError(
                f"{what}: width {width} is not a multiple of the alignment {self.alignment}")
        if width % self.nest_blocks:
            raise GranularityError(
                f"{what}: width {width} is not a multiple of ffn_nest_blocks={self.nest_blocks} "
                "(every nesting block holds an equal prefix)")
        return width

    def uniform(self, name: str) -> tuple[int, ...]:
        """The width vector of one named granularity in every layer."""
        return self.resolve(name)

    def resolve(self, value: WidthsLike) -> tuple[int, ...]:
        """Turns a name, an integer, or a per-layer list of names/integers into a width vector.

        Accepted: "M"; 1024; "S,M,L,XL,..." (one entry per layer); ["S", 1024, ...].
        A single name or integer applies to every layer.
        """
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
            if not items:
                raise GranularityError("empty width specification")
            if len(items) == 1:
                return self._capped((self._one(items[0], "all layers"),) * self.n_layers,
                                    [items[0]] * self.n_layers)
            value = items
        elif isinstance(value, int) and not isinstance(value, bool):
            return (self._one(value, "all layers"),) * self.n_layers
        items = list(value)
        if len(items) != self.n_layers:
            raise GranularityError(
                f"width vector has {len(items)} entries but the model has {self.n_layers} "
                f"layers: {items}")
        return self._capped(tuple(self._one(v, f"layer {i}") for i, v in enumerate(items)),
                            items)

    def _capped(self, widths: tuple, items) -> tuple:
        """Named entries cut to their layer's cap (`layer_caps`); integers stay as given
        (ModelConfig.resolve_widths refuses one above its layer's stored width)."""
        if not self.layer_caps:
            return widths
        return tuple(min(w, cap) if isinstance(item, str) and item in self.by_name else w
                     for w, cap, item in zip(widths, self.layer_caps, items))

    def _one(self, item: Union[str, int], where: str) -> int:
        if isinstance(item, str):
            if item in self.by_name:
                return self.by_name[item]
            if item.lstrip("-").isdigit():
                return self.check_width(int(item), what=where)
            raise GranularityError(
                f"{where}: unknown granularity {item!r}; known: {', '.join(self.names)}")
        return self.check_width(item, what=where)

    def name_of(self, widths: Sequence[int]) -> str:
        """A label: the name (or width) if uniform, else the per-layer names/widths."""
        inverse = {w: n for n, w in self.by_name.items()}
        labels = [inverse.get(w, str(w)) for w in widths]
        return labels[0] if len(set(labels)) == 1 else ",".join(labels)
