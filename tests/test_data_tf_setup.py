"""matlm.data.tf_setup: TensorFlow's C++ start-up noise is silenced unless asked for."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# absl's C++ log line format: severity letter, MMDD, time, thread id, file:line].
ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\]", re.M)
# JAX is imported first, as the trainer does (JAX sets TF_CPP_MIN_LOG_LEVEL=1 itself).
PROBE = ("import jax, matlm.data.tf_setup as t, sys; "
         "print('after import', file=sys.stderr); print(t.tf.__version__)")


def _stderr_of_import(**env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip()  # TensorFlow did import.
    return out.stderr


def test_start_up_lines_silenced_by_default_and_shown_on_request():
    loud = _stderr_of_import(TF_CPP_MIN_LOG_LEVEL="0")
    if not ABSL_LINE.search(loud):
        pytest.skip("this TensorFlow build prints no start-up lines to silence")
    quiet = _stderr_of_import()
    assert not ABSL_LINE.search(quiet), quiet
    # Stderr is restored afterwards: later messages still reach the user.
    assert "after import" in quiet
