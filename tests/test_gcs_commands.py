"""Every command on a gs:// model dir, against fake-gcs-server on loopback (fixtures `gcs`,
`bucket`: tests/conftest.py; training, locks and checkpoints: test_gcs_model_dir.py).

The reference is the same run copied object for object to a local dir: each command's
output from the bucket must equal its output from the copy (info, generate, search,
extract, export), and what a command writes into the bucket must equal what it writes
locally. Faults on a bucket: kill -9 of a `matlm train` process while its save is in
flight resumes bit for bit; a bucket that disappears under a save is one line, exit 74.
Permissions (the emulator's gate answers GCS's 403, tests/gcs_emulator.py): readers need
no write access; a missing one is one line naming it; write access revoked in the middle
of a save is one line, exit 74, and the resume, meeting transient 429/5xx answers that
the clients retry, equals a continuous run. A sweep whose base dir is on the bucket runs,
reruns nothing, and is collected.
"""
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_faults import KILL_DURING_SAVE, assert_params_equal, flags  # noqa: E402
from test_sweep import tiny_sweep_file  # noqa: E402

import gcs_emulator  # noqa: E402

from matlm.cli.main import main as matlm_main  # noqa: E402
from matlm.model_dir import ModelDir, storage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def download(url: str, local: Path) -> Path:
    """Every object under gs:// `url`/ written to `local` (same relative names)."""
    bucket_name, prefix = storage.bucket_and_prefix(url)
    for blob in storage.gcs_client().list_blobs(bucket_name, prefix=prefix + "/"):
        target = local / blob.name[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
    return local


def objects(url: str) -> dict:
    """{relative name: bytes} of every object under gs:// `url`/."""
    bucket_name, prefix = storage.bucket_and_prefix(url)
    return {b.name[len(prefix) + 1:]: b.download_as_bytes()
            for b in storage.gcs_client().list_blobs(bucket_name, prefix=prefix + "/")}


def files(local: Path) -> dict:
    return {p.relative_to(local).as_posix(): p.read_bytes()
            for p in local.rglob("*") if p.is_file()}


def train_rows(model_dir) -> dict:
    rows = [json.loads(line) for line in ModelDir(model_dir).metrics_file.read_text().splitlines()]
    found = {}
    for row in rows:
        if "train/loss" in row:
            assert row["step"] not in found, f"step {row['step']} logged twice"
            found[row["step"]] = row["train/loss"]
    return found


@pytest.fixture(scope="module")
def run(gcs, tmp_path_factory, wiki_vocab):
    """(gs:// url, local copy) of a tiny run `matlm train` wrote to a bucket (4 steps,
    checkpoints at 2 and 4), trained in this process on one device."""
    import jax
    import matlm.training.mesh as mesh_lib
    name = f"matlm-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(name)
    url = f"gs://{name}/run"
    original = mesh_lib.make_mesh
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mesh_lib, "make_mesh",
                      lambda shape, devices=None: original(shape, devices or jax.devices()[:1]))
        assert matlm_main(["train", *flags(url, wiki_vocab, STEPS)]) == 0
    return url, download(url, tmp_path_factory.mktemp("copy") / "run")


def test_info_generate_and_verify_read_the_bucket_as_the_local_copy(run, gcs, capsys):
    url, local = run
    outputs = []
    # A job with read access only (roles/storage.objectViewer) reads a run: readers write
    # nothing, not even a lock (the gate counts the writes it refused).
    with gcs.refusing(*gcs_emulator.WRITE) as gate:
        for where in (url, local):
            for command in (["info"], ["generate", "--prompt=The river", "--max_new_tokens=8"],
                            ["verify"]):
                assert matlm_main([command[0], f"--model_dir={where}", *command[1:]]) == 0, \
                    command
            outputs.append(capsys.readouterr().out.replace(str(where), "MODEL_DIR"))
    assert gate.refusals == 0
    assert outputs[0] == outputs[1]
    assert '"status": "ok"' in outputs[0]


def test_search_writes_into_the_bucket_what_it_writes_locally(run, tmp_path, capsys):
    url, local = run
    search = ["search", "--budget_params=1e9", "--max_evals=4", "--eval_batches=1",
              "--batch_size=2", "--no_progress", "--no_plots"]
    assert matlm_main([*search, f"--model_dir={local}", f"--output={tmp_path / 'local'}"]) == 0
    assert matlm_main([*search, f"--model_dir={url}"]) == 0  # Default: the bucket's search/.
    printed = capsys.readouterr().out
    (slug,) = {name.split("/")[0] for name in objects(f"{url}/search")}
    on_bucket, on_disk = objects(f"{url}/search/{slug}"), files(tmp_path / "local")
    assert sorted(on_bucket) == sorted(on_disk) == ["best.json", "candidates.csv", "front.csv"]
    for name in ("candidates.csv", "front.csv"):
        assert on_bucket[name] == on_disk[name]
    best = [json.loads(d["best.json"]) for d in (on_bucket, on_disk)]
    for b in best:
        b.pop("checkpoint", None)
    assert best[0] == best[1]
    assert f"to {url}/search/{slug}" in printed
    # The same search again: its output dir exists and is not empty; nothing is overwritten.
    assert matlm_main([*search, f"--model_dir={url}"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert objects(f"{url}/search/{slug}") == on_bucket


def test_extract_to_a_bucket_and_export_from_it(run, tmp_path, capsys):
    url, local = run
    bucket = url.rsplit("/", 1)[0]
    assert matlm_main(["extract", f"--model_dir={local}", "--widths=M",
                       f"--output={tmp_path / 'M'}"]) == 0
    assert matlm_main(["extract", f"--model_dir={url}", "--widths=M",
                       f"--output={bucket}/M"]) == 0
    assert f"to {bucket}/M" in capsys.readouterr().out
    assert_params_equal(f"{bucket}/M", tmp_path / "M", 0)  # Orbax's commit marker there.
    assert ModelDir(f"{bucket}/M").checkpoint_steps() == [0]
    for name in ("model.gin", "vocab.model"):
        assert objects(f"{bucket}/M")[name] == (tmp_path / "M" / name).read_bytes()
    # A non-empty output is refused before anything is read or written.
    assert matlm_main(["extract", f"--model_dir={url}", "--widths=S",
                       f"--output={bucket}/M"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    pytest.importorskip("transformers")  # The export extra; CI installs it.
    assert matlm_main(["export", f"--model_dir={tmp_path / 'M'}",
                       f"--output={tmp_path / 'hf'}"]) == 0
    assert matlm_main(["export", f"--model_dir={bucket}/M", f"--output={bucket}/hf"]) == 0
    exported, local_files = objects(f"{bucket}/hf"), files(tmp_path / "hf")
    assert sorted(exported) == sorted(local_files)
    differ = [n for n in exported if exported[n] != local_files[n] and n != "matlm_export.json"]
    assert not differ, differ  # Only the provenance names its source dir.


@pytest.mark.slow
def test_kill_9_during_a_save_on_a_bucket_resumes_bitwise(run, bucket, wiki_vocab, capsys,
                                                          one_device, tmp_path):
    reference, _ = run
    url = f"{bucket}/run"
    env = {**__import__("os").environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(step=2), "train",
                             *flags(url, wiki_vocab, STEPS)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert storage.gcs_client().bucket(bucket[5:]).blob("run/writer.lock").exists()
    assert matlm_main(["train", *flags(url, wiki_vocab, STEPS)]) == 0
    out = capsys.readouterr().out
    assert "took over the stale writer lock" in out
    assert train_rows(url) == train_rows(reference)  # Bitwise, each step once.
    assert_params_equal(url, reference, STEPS)
    assert ModelDir(url).checkpoint_steps() == [2, 4]


def train_with_a_fault_before_save(step, url, vocab, monkeypatch, fault, undo=lambda: None):
    """`matlm train` of STEPS steps on `url` (in this process) with `fault(checkpointer)`
    run just before `step`'s save, and `undo()` once it has ended: its exit status."""
    import matlm.model_dir as model_dir_lib
    original = model_dir_lib.RunCheckpointer.save

    def save(self, at, *args, **kwargs):
        if at == step:
            fault(self)
        return original(self, at, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(model_dir_lib.RunCheckpointer, "save", save)
        try:
            return matlm_main(["train", *flags(url, vocab, STEPS)])
        finally:
            undo()


def test_a_bucket_gone_under_a_save_is_one_line_exit_74(bucket, wiki_vocab, capsys,
                                                        one_device, monkeypatch):
    url, client = f"{bucket}/run", storage.gcs_client()

    def delete_bucket(checkpointer):  # The bucket is deleted (or access revoked) mid-run.
        for blob in client.list_blobs(bucket[5:]):
            blob.delete()
        client.bucket(bucket[5:]).delete()
    assert train_with_a_fault_before_save(2, url, wiki_vocab, monkeypatch, delete_bucket) == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "could not save checkpoint 2" in err[0] and "[ENOENT]" in err[0], err
    assert f"check that the bucket {bucket} exists" in err[0].lower(), err


@pytest.mark.parametrize("permission, command, status, message", [
    # Writers check the bucket up front (exit 2: fix the setup before any work) ...
    pytest.param("storage.objects.list", "train", 2, "model dir {url}: no permission to list "
                 "gs://{name} (grant storage.objects.list, e.g. roles/storage.objectViewer)",
                 id="list-train"),
    pytest.param(gcs_emulator.WRITE, "train", 2, "model dir {url}: no permission to write in "
                 "gs://{name} (grant storage.objects.create and .delete", id="write-train"),
    # ... a reader finds out at its first read (exit 74: the environment refused).
    pytest.param("storage.objects.list", "info", 74, "Cloud Storage refused a request on "
                 "gs://{name}: this job lacks storage.objects.list; grant it (e.g. "
                 "roles/storage.objectViewer), then run the same command", id="list-info"),
])
def test_a_missing_permission_is_one_line_before_any_work(gcs, bucket, wiki_vocab, capsys,
                                                          one_device, permission, command,
                                                          status, message):
    url = f"{bucket}/run"
    args = flags(url, wiki_vocab, STEPS) if command == "train" else [f"--model_dir={url}"]
    with gcs.refusing(*([permission] if isinstance(permission, str) else permission)) as gate:
        assert matlm_main([command, *args]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message.format(url=url, name=bucket[5:]) in err[0], err
    assert gate.refusals > 0  # The bucket refused: this is not another failure.
    assert objects(url) == {}


def test_write_access_revoked_in_a_save_is_one_line_exit_74_and_a_retried_resume_is_exact(
        run, gcs, bucket, wiki_vocab, capsys, caplog, one_device, monkeypatch):
    reference, _ = run
    url = f"{bucket}/run"

    def revoke(checkpointer):
        # Checkpoint 2 is complete; access is revoked once the save of 4 has written its
        # arrays, at its commit marker (the last object).
        checkpointer.manager.wait_until_finished()
        gcs.refuse(*gcs_emulator.WRITE, from_request="/checkpoints/4/commit_success")
    assert train_with_a_fault_before_save(4, url, wiki_vocab, monkeypatch, revoke,
                                          gcs.refuse) == 74
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "could not save checkpoint 4: Permission denied [EACCES]" in error, error
    # Its objects cannot be deleted either: said, and the next job removes them.
    assert ("; could not remove the partial 4/ (this job lacks storage.objects.delete); "
            "checkpoints intact: 2. ") in error, error
    assert f"Grant this job write access to {bucket} (storage.objects.create" in error, error
    assert error.endswith("then run the same command to resume from checkpoint 2"), error
    # Nor its lock: a warning, never in place of the error above.
    (warning,) = [r.getMessage() for r in caplog.records if "writer lock" in r.getMessage()]
    assert warning == (f"could not remove the writer lock {url}/writer.lock (this job "
                       "lacks storage.objects.delete); the next job takes it over as stale")
    assert ModelDir(url).checkpoint_steps() == [2]

    # Access back, the same command takes the left lock over and resumes from checkpoint
    # 2. Its save meets the transient errors GCS asks clients to retry (429, 5xx): Orbax's
    # listing (gcsfs), TensorStore's reads and writes. It ends where a continuous run ends.
    def flaky(checkpointer):
        gcs.fail_next((503, "prefix=run/checkpoints/4/"), (429, "prefix=run/checkpoints/4/"),
                      (500, "checkpoints/4/.*ocdbt"), (503, "^/upload/.*checkpoints/4/"))
    assert train_with_a_fault_before_save(4, url, wiki_vocab, monkeypatch, flaky,
                                          gcs.fail_next) == 0
    assert len(gcs.gate.failed) == 4, gcs.gate.failed  # Every failure was met, and retried.
    assert "(left by an earlier job of this process" in capsys.readouterr().out
    assert train_rows(url) == train_rows(reference)
    assert_params_equal(url, reference, STEPS)
    assert ModelDir(url).checkpoint_steps() == [2, 4]


@pytest.mark.slow
def test_a_sweep_on_a_bucket_runs_reruns_nothing_and_collects(bucket, tmp_path, capsys,
                                                             one_device_subprocesses, wiki_vocab):
    sweep = tiny_sweep_file(tmp_path, wiki_vocab, {"ModelConfig.n_layers": 1}, """
list: {TrainConfig.learning_rate: [1.0e-3]}
labels: {TrainConfig.learning_rate: lr}
""")  # One trial: the many-trial logic is test_sweep.py's; here, where everything goes.
    base = f"{bucket}/sweep"
    command = ["sweep", "--gin_file=configs/runs/default.gin", f"--sweep={sweep}",
               f"--base_dir={base}", "--no_plots"]
    assert matlm_main(command) == 0
    assert "1 of 1 trials done" in capsys.readouterr().out
    written = objects(base)
    rows = written["sweep_results.csv"].decode().splitlines()
    assert len(rows) == 2 and ",done," in rows[1], rows
    trial = "lr=0.001"
    assert json.loads(written[f"{trial}/trial.json"])["status"] == "done"
    assert b"$ " in written[f"{trial}/train.log"]  # The trial's log, uploaded whole.
    assert ModelDir(f"{base}/{trial}").checkpoint_steps() == [2]
    assert f"# Sweep results ({base})" in written["sweep_results.md"].decode()
    # A rerun runs nothing; --collect_only writes the same table from the bucket.
    assert matlm_main(command) == 0
    assert "started" not in capsys.readouterr().out
    assert matlm_main([*command, "--collect_only"]) == 0
    assert objects(base)["sweep_results.csv"] == written["sweep_results.csv"]
    assert json.loads(objects(base)[f"{trial}/trial.json"])["attempts"] == 1
