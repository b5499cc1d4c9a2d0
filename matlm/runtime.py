"""Process-level settings that must be in place before the process allocates: applied
by re-executing the command once, at the console entry point and in the benchmarks.

Transparent huge pages for malloc. XLA:CPU allocates each step's temporary buffers
afresh (3 GB for the benchmark_train shape), and glibc serves large blocks with fresh
mmap'd pages, so every step takes ~800,000 minor page faults (4 KiB each) to touch
them again. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks
for transparent huge pages (2 MiB): ~2,300 faults per step and about 6 % faster steps
on a 2-core CPU (see the README's performance notes). Kernels whose THP mode is
`madvise` need the tunable; `always` already gives huge pages; `never` cannot.
Set MATLM_NO_HUGEPAGES=1 to leave the process alone.
"""
from __future__ import annotations

import os
import sys

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return None
    if not name or not name.startswith("glibc "):
        return None
    try:
        major, minor = name.split()[1].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def hugepage_malloc_wanted(environ=None) -> bool:
    """Whether re-executing with the huge-page malloc tunable would change anything."""
    environ = os.environ if environ is None else environ
    if environ.get("MATLM_NO_HUGEPAGES") or not sys.platform.startswith("linux"):
        return False
    if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return False  # Already set (by us or the user): never loop, never override.
    version = _glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        with open(_THP_MODE_FILE) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def reexec_with_hugepage_malloc() -> None:
    """Re-executes this very command line with the tunable set, if it is wanted.

    Returns (doing nothing) when it is not. Call it first thing in a program's entry
    point, never from library code or tests: it replaces the running process.
    """
    if not hugepage_malloc_wanted():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGEPAGE_TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
    except OSError as e:
        # The interpreter cannot be exec'd (deleted or replaced venv, a noexec mount, a
        # seccomp policy): huge pages are a speed-up, not a requirement, so carry on in
        # this process without them. MATLM_NO_HUGEPAGES=1 skips the attempt.
        print(f"matlm: warning: running without huge pages: cannot re-execute "
              f"{sys.executable} ({e.strerror or e}); set MATLM_NO_HUGEPAGES=1 to skip "
              "this", file=sys.stderr)
