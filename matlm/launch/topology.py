"""Topology strings → the devices to compile for, with HBM and peak FLOP/s per chip.

`v5e:4x4`, `v5p:2x2x4`, `v6e:8x8`, `v4:2x2x2` name TPU slices by chip grid; libtpu
(`pip install -e ".[tpu]"`) describes them without hardware
(`jax.experimental.topologies.get_topology_desc`), so a step compiles for a pod on a
laptop. `local` is this machine's `jax.devices()` (a GPU host, or CPU devices).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Optional

from matlm.messages import first_line

GiB = 1 << 30


class TopologyError(ValueError):
    """A topology string that names no slice, or a slice that cannot be described here."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    family: str            # as written in topology strings: v5e
    grid_dims: int         # 2 (v5e, v6e: 2-D torus) or 3 (v4, v5p: 3-D)
    # HBM one device may use, as libtpu 0.0.42.1 reports it in its out-of-memory error
    # ("exceeds available HBM (15.75G)"); tests/test_compile.py checks this table against
    # libtpu, so a libtpu that changes it fails there rather than silently here.
    hbm_bytes: int
    peak_flops_key: str    # row of matlm.training.metrics.KNOWN_PEAK_FLOPS (bf16 data sheet)
    # v4 and v5p chips hold two TensorCores; "megacore" makes one device per chip (how
    # they are used in practice, and how their HBM figure is per chip). v5e/v6e: one core.
    chip_config_name: str = "default"


CHIPS = {
    "v4": ChipSpec("v4", 3, int(30.75 * GiB), "TPU v4", "megacore"),
    "v5e": ChipSpec("v5e", 2, int(15.75 * GiB), "TPU v5e"),
    "v5p": ChipSpec("v5p", 3, int(95.74 * GiB), "TPU v5p", "megacore"),
    "v6e": ChipSpec("v6e", 2, int(31.25 * GiB), "TPU v6e"),
}
ACCEPTED = ("local, or CHIP:GRID with CHIP one of v5e, v6e (2-D grid, e.g. v5e:4x4) or "
            "v4, v5p (3-D grid, e.g. v5p:2x2x4)")
_TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)$")
_SLICE_COMMENT_RE = re.compile(r"^\s*#\s*slice:\s*(\S+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a step is compiled for: its devices and what one device offers."""
    name: str                      # the topology string, e.g. v5e:4x4 or local
    devices: tuple
    hbm_bytes: Optional[int]       # memory one device may use; None: unknown
    hbm_source: str
    peak_flops: Optional[float]    # bf16 (TPU/GPU) FLOP/s per device; None: unknown
    peak_source: str
    is_tpu_topology: bool


def parse_topology(topology: str) -> tuple[ChipSpec, tuple[int, ...]]:
    """`v5e:4x4` → (the v5e ChipSpec, (4, 4)); a clear error for anything else."""
    match = _TOPOLOGY_RE.match(topology.strip())
    if not match:
        raise TopologyError(f"unknown topology {topology!r}; accepted: {ACCEPTED}")
    chip = CHIPS[match.group(1)]
    grid = tuple(int(d) for d in match.group(2).split("x"))
    if len(grid) != chip.grid_dims or min(grid) < 1:
        example = "x".join(["2"] * chip.grid_dims)
        raise TopologyError(f"topology {topology!r}: {chip.family} slices have a "
                            f"{chip.grid_dims}-D chip grid of positive sizes, e.g. "
                            f"{chip.family}:{example}")
    return chip, grid


def slice_from_gin_files(gin_files) -> Optional[str]:
    """The topology a recipe names in a header comment `# slice: v5e:4x4` (the last gin
    file that has one wins, as later files override earlier ones)."""
    from matlm.gin_config import resolve_gin_file
    found = None
    for path in gin_files:
        for line in Path(resolve_gin_file(path)).read_text().splitlines():
            match = _SLICE_COMMENT_RE.match(line)
            if match:
                found = match.group(1)
                break
    return found


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _no_tpu_attached() -> bool:
    return not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def prepare_libtpu_environment() -> None:
    """Environment for loading libtpu only to *describe* TPUs, set before it loads.

    - ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu takes /tmp/libtpu_lockfile; any other process
      that loaded it (another compile, a test worker) would make this one fail with
      "Internal error when accessing libtpu multi-process lockfile".
    - TPU_SKIP_MDS_QUERY: do not ask the GCE metadata server what TPU this host has.
    - On a host with no TPU attached, a dummy accelerator type and worker hostname, or
      libtpu logs a screenful of "could not determine TPU accelerator type" on load.
      (Not set on a TPU VM, where libtpu must find its own chips.)
    Only defaults: a value the user set wins.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if _no_tpu_attached():
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _peak_flops(key: str) -> float:
    from matlm.training.metrics import KNOWN_PEAK_FLOPS
    return KNOWN_PEAK_FLOPS[key]


def tpu_target(topology: str) -> Target:
    chip, grid = parse_topology(topology)
    if not libtpu_installed():
        raise TopologyError(f"compiling for {topology} needs libtpu (TPU topology "
                            "descriptions); install it with: pip install -e \".[tpu]\"")
    prepare_libtpu_environment()
    from jax.experimental import topologies
    name = f"{chip.family}:{'x'.join(map(str, grid))}"
    try:
        description = topologies.get_topology_desc(
            topology_name=name, platform="tpu", chip_config_name=chip.chip_config_name)
    except Exception as e:  # JaxRuntimeError from libtpu: say which string it refused.
        raise TopologyError(f"libtpu cannot describe topology {topology!r}: "
                            f"{first_line(e)}") from e
    chips = math.prod(grid)
    devices = tuple(description.devices)
    if len(devices) != chips:  # One device per chip is what the HBM figure assumes.
        raise TopologyError(f"topology {topology!r} gave {len(devices)} devices for "
                            f"{chips} chips; expected one device per chip")
    return Target(name=name, devices=devices, hbm_bytes=chip.hbm_bytes,
                  hbm_source=f"{chip.family} HBM per chip as libtpu reports it",
                  peak_flops=_peak_flops(chip.peak_flops_key),
                  peak_source=f"{chip.peak_flops_key} bf16 data sheet",
                  is_tpu_topology=True)


def local_target() -> Target:
    """This machine's devices. HBM: the allocator's limit where the backend reports one
    (GPU); on CPU the physical memory shared by the (possibly fake) devices."""
    import jax
    from matlm.training.metrics import peak_flops_per_device
    devices = tuple(jax.devices())
    hbm, source = None, "unknown"
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # CPU backends may not implement memory stats.
        stats = {}
    if stats.get("bytes_limit"):
        hbm, source = int(stats["bytes_limit"]), f"{devices[0].device_kind} allocator limit"
    elif devices[0].platform == "cpu":
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            hbm = physical // len(devices)
            source = f"host RAM shared by {len(devices)} CPU devices"
        except (ValueError, OSError):
            pass
    peak, peak_source = peak_flops_per_device(None)
    return Target(name="local", devices=devices, hbm_bytes=hbm, hbm_source=source,
                  peak_flops=peak, peak_source=peak_source, is_tpu_topology=False)


def make_target(topology: str) -> Target:
    """The devices (and their HBM and peak) that `topology` names."""
    if topology.strip() == "local":
        return local_target()
    parse_topology(topology)  # Refuse a bad string before touching libtpu.
    return tpu_target(topology)
