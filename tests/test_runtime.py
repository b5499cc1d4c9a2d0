"""matlm.runtime: the one-time re-exec with huge-page malloc."""
from __future__ import annotations

import os
import subprocess
import sys

from matlm import runtime

PROBE = ("from matlm.runtime import reexec_with_hugepage_malloc; "
         "reexec_with_hugepage_malloc(); import os, sys; "
         "print(os.environ.get('GLIBC_TUNABLES')); print(sys.argv[1:])")


def test_not_wanted_when_disabled_or_already_set():
    assert not runtime.hugepage_malloc_wanted({"MATLM_NO_HUGEPAGES": "1"})
    assert not runtime.hugepage_malloc_wanted({"GLIBC_TUNABLES": runtime.HUGEPAGE_TUNABLE})
    # A user's own hugetlb choice is never overridden.
    assert not runtime.hugepage_malloc_wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def test_reexec_sets_the_tunable_once_and_keeps_the_command_line():
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "MATLM_NO_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", PROBE, "--gin.x=1", "positional"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    tunables, argv = out.splitlines()
    if runtime.hugepage_malloc_wanted(env):
        assert tunables == runtime.HUGEPAGE_TUNABLE  # Re-executed exactly once (no loop).
    else:
        assert tunables == "None"  # Left alone where THP/glibc cannot use it.
    assert argv == "['--gin.x=1', 'positional']"


def test_existing_tunables_are_kept_and_opt_out_is_honoured():
    env = {k: v for k, v in os.environ.items() if k != "MATLM_NO_HUGEPAGES"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.tcache_count=7"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()[0]
    if runtime.hugepage_malloc_wanted(env):
        assert out == "glibc.malloc.tcache_count=7:" + runtime.HUGEPAGE_TUNABLE
    else:
        assert out == "glibc.malloc.tcache_count=7"
    env["MATLM_NO_HUGEPAGES"] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()[0]
    assert out == "glibc.malloc.tcache_count=7"
