"""Environment faults during a save, end to end through `matlm train`: a full disk, a
read-only checkpoints dir, and an OS error injected at Orbax's write. The promise (README,
docs/fault_tolerance.md): exit 74 (EX_IOERR, not 2 = bad input), ONE line naming the step
whose save failed, the path and what failed, reported at that save (not at the next one);
no partial `<step>.orbax-checkpoint-tmp*` left holding space; the checkpoints already saved
untouched, so the same command resumes from the last good one, bit for bit.

The full disk is a 40 MB tmpfs and the read-only dir a read-only bind mount (as root; as
another user, `chmod -w`): each test skips with the reason where it cannot mount. The
injected test always runs, so the reporting path is always tested.
"""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from matlm.cli.main import EXIT_ENVIRONMENT
from matlm.cli.main import main as matlm_main
from matlm.model_dir.checkpoints import os_error_of

from test_faults import assert_params_equal, one_device  # noqa: F401  (an autouse fixture)
from test_faults import flags as fault_flags

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
STEPS = 8  # Checkpoints every 2 steps: 2, 4, 6, 8.


def flags(model_dir, vocab, steps=STEPS, *extra):
    return fault_flags(model_dir, vocab, steps, *extra)


def train_subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "matlm.cli.main", "train", *args], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)


def checkpoint_dirs(model_dir) -> list:
    return sorted(p.name for p in (Path(model_dir) / "checkpoints").iterdir())


def saved_steps(model_dir) -> list:
    return [int(name) for name in checkpoint_dirs(model_dir) if name.isdigit()]


def assert_one_line_error(result, step: int, code: str) -> str:
    """The failed job's stderr is one line naming the step, the errno and a path."""
    assert result.returncode == EXIT_ENVIRONMENT, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("matlm train: error: could not save checkpoint "
                           f"{step}: "), line
    assert f"[{code}]" in line and "/checkpoints/" in line, line
    return line


def mount(*args) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs (two checkpoints of the test model fit, not three); skips where this
    user cannot mount one."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected test covers reporting")
    try:
        mount("-t", "tmpfs", "-o", "size=40m", "tmpfs", str(where))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({getattr(e, 'stderr', e)})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def make_read_only(directory: Path):
    """Makes `directory` refuse writes; returns how to undo it. Root ignores permission
    bits, so as root a read-only bind mount of it; else chmod -w."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return lambda: directory.chmod(0o755)
    try:
        mount("--bind", str(directory), str(directory))
        mount("-o", "remount,bind,ro", str(directory))
    except (OSError, subprocess.CalledProcessError) as e:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
        pytest.skip(f"as root, chmod does not stop writes and a read-only bind mount "
                    f"failed ({getattr(e, 'stderr', e)})")
    return lambda: subprocess.run(["umount", "-l", str(directory)], capture_output=True)


@pytest.fixture(scope="module")
def continuous(tmp_path_factory, wiki_vocab):
    """The same run trained start to end on a roomy disk: what a resumed run must equal."""
    model_dir = tmp_path_factory.mktemp("continuous") / "run"
    result = train_subprocess(*flags(model_dir, wiki_vocab))
    assert result.returncode == 0, result.stderr
    return model_dir


# --- A real full disk. ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_during_a_save_gives_exit_74_one_line_no_orphan_and_a_bitwise_resume(
        small_disk, wiki_vocab, continuous):
    """Disk full at the save of step 6 (after 2 and 4 fit): exit 74, one line naming step 6,
    ENOSPC and the file, reported before the next save (step 8); the partial
    6.orbax-checkpoint-tmp is removed; checkpoints 2 and 4 verify; once space is freed the
    same command resumes from 4 and ends bit for bit equal to an uninterrupted run."""
    model_dir = small_disk / "run"
    result = train_subprocess(*flags(model_dir, wiki_vocab))
    line = assert_one_line_error(result, 6, "ENOSPC")
    assert "No space left on device" in line and "removed the partial" in line, line
    assert checkpoint_dirs(model_dir) == ["2", "4"]  # No orphan, nothing else touched.
    assert matlm_main(["verify", f"--model_dir={model_dir}"]) == 0  # 2 and 4: checksums match.
    # Reported before the next save: the async save of 6 fails in the background, and the
    # job stops at the first per-step check that sees it or, at the latest, at the save of
    # step 8 (which waits for 6 first), so no step past 8 is trained. On a loaded machine
    # the background write may take until step 8, so "< 8" would test the machine's load.
    import json
    logged = [json.loads(l)["step"] for l in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) <= 8, logged
    # Free space (grow the tmpfs), run the same command: it resumes from 4, bit for bit.
    mount("-o", "remount,size=200m", str(small_disk))
    rerun = train_subprocess(*flags(model_dir, wiki_vocab))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {model_dir / 'checkpoints' / '4'}" in rerun.stdout
    assert_params_equal(model_dir, continuous, STEPS)


# --- A read-only checkpoints dir. -------------------------------------------------------------

@pytest.mark.slow
def test_a_read_only_checkpoints_dir_gives_exit_74_and_one_line(tmp_path, wiki_vocab):
    """Write permission lost after checkpoint 2 (read-only mount as root, chmod -w
    otherwise): the resumed job's save of step 4 fails at once with exit 74 and one line
    naming step 4, the errno (EROFS or EACCES) and the checkpoint's path; checkpoint 2 is
    untouched and nothing is left behind (the job also exits promptly: Orbax's threads are
    never started on a dir that refuses writes)."""
    model_dir = tmp_path / "run"
    assert matlm_main(["train", *flags(model_dir, wiki_vocab, STEPS, "--stop_at=2")]) == 0
    undo = make_read_only(model_dir / "checkpoints")
    try:
        result = train_subprocess(*flags(model_dir, wiki_vocab))
    finally:
        undo()
    code = "EROFS" if os.geteuid() == 0 else "EACCES"
    line = assert_one_line_error(result, 4, code)
    assert str(model_dir / "checkpoints" / "4") in line, line
    assert checkpoint_dirs(model_dir) == ["2"]
    assert matlm_main(["verify", f"--model_dir={model_dir}"]) == 0  # Its checksums match.


# --- An OS error injected where Orbax writes (runs everywhere). ------------------------------

@pytest.mark.parametrize("failing, kept", [(6, [2, 4]),      # a periodic save, mid-run
                                           (8, [2, 4, 6])])  # the final save
def test_an_enospc_raised_inside_orbaxs_asynchronous_write_is_one_line_with_exit_74(
        tmp_path, wiki_vocab, monkeypatch, capfd, failing, kept):
    """OSError(ENOSPC) raised in Orbax's background write of step `failing` (the boundary
    where TensorStore fails on a full disk): `matlm train` returns 74, prints one line
    naming that step, ENOSPC and the file, removes its partial <step>.orbax-checkpoint-tmp,
    and keeps the checkpoints before it; the same command then resumes from the last of
    them and finishes."""
    from orbax.checkpoint._src.serialization import serialization
    real_write = serialization.async_serialize_from_host

    async def full_at_step_6(rslices, tensorstore_spec, *args, **kwargs):
        where = str(tensorstore_spec.get("kvstore", tensorstore_spec))
        if f"/{failing}.orbax-checkpoint-tmp" in where:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                          f"{tmp_path}/run/checkpoints/{failing}.orbax-checkpoint-tmp/params")
        return await real_write(rslices, tensorstore_spec, *args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", full_at_step_6)
    model_dir = tmp_path / "run"
    capfd.readouterr()
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == EXIT_ENVIRONMENT
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    mentions = [l for l in (out + err).splitlines()
                if f"checkpoint {failing}" in l or "ENOSPC" in l]
    assert len(mentions) == 1, out + err
    assert mentions[0].startswith(f"matlm train: error: could not save checkpoint {failing}: "
                                  "No space left on device [ENOSPC] writing "), mentions[0]
    assert checkpoint_dirs(model_dir) == [str(step) for step in kept]
    monkeypatch.setattr(serialization, "async_serialize_from_host", real_write)
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    assert f"resumed from {model_dir / 'checkpoints' / str(kept[-1])}" in capfd.readouterr().out
    assert saved_steps(model_dir) == [4, 6, 8]


# --- The pieces. ------------------------------------------------------------------------------

TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "layer_0.ffn.wi_up/0.0" in OCDBT database at local '
    'file "/mnt/f/run/checkpoints/6.orbax-checkpoint-tmp/params.orbax-checkpoint-tmp/'
    'ocdbt.process_0/": Failed writing: "/mnt/f/run/checkpoints/6.orbax-checkpoint-tmp/'
    'params.orbax-checkpoint-tmp/ocdbt.process_0/d/d9fe63": Failed to write 2332030 bytes '
    "to file 8: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("error, expected", [
    # TensorStore's status message (as Orbax re-raises it): the errno and the file.
    (ValueError(TENSORSTORE_ENOSPC),
     (errno.ENOSPC, "/mnt/f/run/checkpoints/6.orbax-checkpoint-tmp/params.orbax-checkpoint-tmp/"
                    "ocdbt.process_0/d/d9fe63")),
    (PermissionError(errno.EACCES, "Permission denied", "/x/checkpoints/4.orbax-checkpoint-tmp"),
     (errno.EACCES, "/x/checkpoints/4.orbax-checkpoint-tmp")),
    (OSError(errno.EROFS, "Read-only file system"), (errno.EROFS, None)),
    (ValueError("shapes differ"), None),  # A bug, not the environment.
])
def test_the_os_error_behind_a_save_failure_is_found_with_its_path(error, expected):
    """The errno and path are read from an OSError or from TensorStore's message; an error
    without one is not taken for an environment fault."""
    assert os_error_of(error) == expected


def test_the_os_error_is_found_in_the_cause_of_a_wrapping_error():
    """Orbax wraps errors; the OS error is looked for along __cause__/__context__."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/d/f")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert os_error_of(outer) == (errno.ENOSPC, "/d/f")


def test_orbax_noise_of_a_failed_save_or_restore_is_filtered_and_other_logs_are_not(tmp_path):
    """Orbax's logged tracebacks of an OS-level save failure, TensorStore's "Event loop is
    closed" callbacks and the read coroutines a failed restore abandons (each printed with
    a TensorStore spec when collected: thousands of lines on stderr) are dropped, the one
    line replacing them; any other log record or unraisable exception still gets through."""
    import logging
    from matlm.model_dir import RunCheckpointer
    RunCheckpointer(tmp_path)  # Installs the filters.
    absl = logging.getLogger("absl")

    def record(exc):
        return logging.LogRecord("absl", logging.ERROR, __file__, 1, "save failed", None,
                                 (type(exc), exc, None))
    assert not all(f.filter(record(ValueError(TENSORSTORE_ENOSPC))) for f in absl.filters)
    assert all(f.filter(record(ValueError("a bug"))) for f in absl.filters)

    async def read_shard():  # Orbax's _read_array_index_and_device_put, in shape.
        return None

    def raised_while_closed():
        error = Exception("Encountered error while reading array index: (slice(0, 128, 1),)")
        error.__cause__ = GeneratorExit()  # The close of the abandoned coroutine.
        return error

    seen = []
    previous = sys.unraisablehook
    abandoned, unrelated = read_shard(), read_shard()
    try:
        sys.unraisablehook = lambda u: seen.append(u.exc_value)
        RunCheckpointer(tmp_path)  # Wraps the current hook.

        class Unraisable:
            def __init__(self, exc, object=None):
                self.exc_type, self.exc_value, self.object = type(exc), exc, object
        sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
        sys.unraisablehook(Unraisable(raised_while_closed(), abandoned))
        others = [RuntimeError("something else"), ValueError("a coroutine's own bug"),
                  raised_while_closed()]  # The last not from a coroutine.
        sys.unraisablehook(Unraisable(others[0]))
        sys.unraisablehook(Unraisable(others[1], unrelated))
        sys.unraisablehook(Unraisable(others[2], object()))
    finally:
        sys.unraisablehook = previous
        abandoned.close(), unrelated.close()
    assert seen == others
