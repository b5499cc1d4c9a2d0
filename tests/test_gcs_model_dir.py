"""Model dirs on GCS (`gs://bucket/path`), against a real GCS-protocol server on loopback
(fake-gcs-server, tests/gcs_emulator.py), not mocks of a client library:

- bad input is one line (exit 2 from the CLI) before any work: gs:// without a bucket,
  an invalid bucket name, another scheme, no GCS client installed, a bucket that does not
  exist; local paths keep their pathlib type and bytes;
- small files (run_config.json, vocab.model, metrics.jsonl) written whole, read back the
  same as a local dir's;
- the writer lock on a bucket: a second writer refused; a stale lock taken over by exactly
  one of two takers (in process at the precondition step, and by two processes); an owner
  whose lock was taken over notices; an owner whose heartbeat the bucket refuses stops as
  an environment fault;
- checkpoints through Orbax/TensorStore on gs://: a flipped byte in an array object is
  caught by the checksums and the checkpoint set aside by copy + delete;
- `matlm train` to gs:// stopped and resumed equals a local continuous run bit for bit;
  `matlm verify` and `matlm eval --tasks=loss` read from the bucket.
"""
import errno
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gcs_emulator  # noqa: E402

from matlm.cli.main import main as matlm_main  # noqa: E402
from matlm.fileio import write_atomically  # noqa: E402
from matlm.model_dir import ModelDir, storage  # noqa: E402
from matlm.model_dir.lock import (BucketWriterLock, LockError, LockHeldError,  # noqa: E402
                                  LockRefreshError, WriterLock, writer_lock)


# --- Bad input that needs no server. ---------------------------------------------------------
def test_local_paths_keep_their_type_and_bytes(tmp_path):
    model_dir = ModelDir(tmp_path / "run")
    assert type(model_dir.path) is type(Path()) and model_dir.path == (tmp_path / "run")
    assert not model_dir.is_url and isinstance(writer_lock(tmp_path), WriterLock)
    assert not isinstance(writer_lock(tmp_path), BucketWriterLock)
    write_atomically(tmp_path / "f.json", '{"a": 1}')
    assert (tmp_path / "f.json").read_bytes() == b'{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # No temporary left.


@pytest.mark.parametrize("url, message", [
    ("gs://", "names no bucket; write gs://BUCKET/path"),
    ("gs:///run", "names no bucket"),
    ("gs://Bad_Bucket/run", "is not a valid GCS bucket name"),
    ("s3://bucket/run", "s3:// is not supported"),
])
def test_bad_urls_are_one_line_and_exit_2(url, message, capsys):
    with pytest.raises(storage.StorageError, match=message):
        ModelDir(url)
    assert matlm_main(["verify", f"--model_dir={url}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_no_gcs_client_names_the_extra(monkeypatch):
    real = storage._find_spec
    monkeypatch.setattr(storage, "_find_spec",
                        lambda util, module: None if module == "gcsfs" else real(util, module))
    with pytest.raises(storage.StorageError, match=r"gcsfs is not installed: pip install "
                                                   r"'matlm\[gcs\]'"):
        ModelDir("gs://some-bucket/run")


def test_a_refused_request_is_named_whichever_client_met_it():
    """The three clients' 403s, in the shapes they were seen to take against the gate (the
    end-to-end cases are in test_gcs_commands.py); a local PermissionError is not one."""
    api = pytest.importorskip("google.api_core.exceptions")
    body = ("job@p.iam.gserviceaccount.com does not have storage.objects.get access to the "
            "Google Cloud Storage object. Permission 'storage.objects.get' denied on resource "
            "(or it may not exist).")
    seen = [api.Forbidden(f"GET http://h/storage/v1/b/bkt/o/run%2Fa?alt=json: {body}"),
            OSError(f"Forbidden: b/bkt/o/run%2Fa\n{body}"),  # gcsfs
            ValueError(f"PERMISSION_DENIED: Error reading gs://bkt/run/a: {body} "
                       "[http_response_code='403']")]  # TensorStore
    try:  # Under a wrapper, as Orbax raises them.
        raise RuntimeError("restore failed") from seen[2]
    except RuntimeError as e:
        seen.append(e)
    for error in seen:
        assert storage.refusal_message(error) == (
            "Cloud Storage refused a request on gs://bkt: this job lacks storage.objects.get; "
            "grant it (e.g. roles/storage.objectViewer), then run the same command"), error
        assert storage.why_refused(error) == "this job lacks storage.objects.get"
    for other in (PermissionError(13, "Permission denied", "/data/403/run"),
                  api.NotFound("GET http://h/storage/v1/b/bkt/o/a: No such object"),
                  ValueError("TrainConfig.steps must be an integer > 0, got 0")):
        assert storage.refusal_message(other) is None, other


# --- Against the emulator (fixtures `gcs`, `bucket`: tests/conftest.py). ---------------------------
def _blob(url: str):
    bucket_name, name = storage.bucket_and_prefix(url)
    return storage.gcs_client().bucket(bucket_name).blob(name)


def test_missing_bucket_is_one_line_before_any_work(gcs, capsys):
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket-x does not exist"):
        storage.check_access("gs://no-such-bucket-x/run", write=True)
    assert matlm_main(["verify", "--model_dir=gs://no-such-bucket-x/run"]) == 2
    err = capsys.readouterr().err
    # The bucket is named (not the generic "model dir does not exist").
    assert "bucket gs://no-such-bucket-x does not exist" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_small_files_are_written_whole_and_read_back(bucket, tmp_path):
    from matlm.model import ModelConfig
    model = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    vocab = tmp_path / "v.model"
    vocab.write_bytes(bytes(range(256)) * 3)
    on_bucket, local = ModelDir(f"{bucket}/run"), ModelDir(tmp_path / "run")
    for model_dir in (on_bucket, local):
        model_dir.check_same_model(model)  # Nothing there yet: accepted.
        model_dir.write_run_files(model, {"task": "t"}, {"steps": 3}, vocab_path=str(vocab))
    # Byte for byte what the local dir holds (the reference), read through the client.
    assert _blob(f"{bucket}/run/run_config.json").download_as_bytes() == \
        local.run_config_file.read_bytes()
    assert on_bucket.run_config().model == local.run_config().model == model
    assert Path(on_bucket.local_vocab_file()).read_bytes() == vocab.read_bytes()
    # Objects only: no temporaries beside them.
    names = sorted(b.name for b in storage.gcs_client().list_blobs(bucket[5:]))
    assert names == ["run/run_config.json", "run/vocab.model"]


def test_a_params_only_checkpoint_saved_to_a_bucket_loads_back(bucket, gcs):
    import flax.linen
    import jax
    from matlm.model import ModelConfig, abstract_params
    from matlm.model_dir import load_checkpoint_for_inference, save_for_inference
    model = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype),
                          flax.linen.meta.unbox(abstract_params(model)))
    with pytest.raises(storage.StorageError, match="does not exist"):  # No bucket made.
        save_for_inference("gs://no-such-bucket-y/x", model, params, step=0)
    assert storage.gcs_client().lookup_bucket("no-such-bucket-y") is None  # Not created.
    save_for_inference(f"{bucket}/extracted", model, params, step=7)
    loaded = load_checkpoint_for_inference(f"{bucket}/extracted")
    assert loaded.step == 7 and loaded.model_config == model
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y),
                 loaded.params, params)


def test_metrics_jsonl_on_a_bucket_matches_a_local_one(bucket, tmp_path):
    from matlm.training.metrics import MetricsWriter
    texts = []
    for where in (f"{bucket}/run", tmp_path / "run"):
        first = MetricsWriter(where)
        for step in range(1, 5):
            first.write(step, {"train/loss": 1.0 / step})
        first.close()
        second = MetricsWriter(where)  # A resumed job: rows past its checkpoint dropped.
        assert second.resume_at(2) == 2
        second.write(3, {"train/loss": 0.5})
        second.close()
        texts.append(ModelDir(where).metrics_file.read_text())
    assert texts[0] == texts[1] and [json.loads(l)["step"] for l in texts[0].splitlines()] \
        == [1, 2, 3]
    events = list(ModelDir(f"{bucket}/run").tensorboard.glob("events.out.tfevents.*"))
    assert events, "no TensorBoard events on the bucket"


# --- The writer lock on a bucket. ---------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_file_lock_message(bucket, tmp_path):
    messages = []
    for where in (f"{bucket}/run", tmp_path / "run"):
        with writer_lock(where) as first:
            with pytest.raises(LockHeldError) as refused:
                writer_lock(where).acquire()
            first.ensure_held()
        messages.append(str(refused.value).replace(str(where), "DIR"))
        writer_lock(where).acquire().release()  # Free again after the release.
    # The two locks were taken at different moments: their start times and heartbeat ages
    # may differ by a second (the bucket's lock is the slower one to take).
    def strip(message):
        return re.sub(r"since [\d-]+ [\d:]+, heartbeat \d+ s ago", "since T", message)
    assert strip(messages[0]) == strip(messages[1])
    assert "since T; lock DIR/writer.lock" in strip(messages[0]), messages
    assert not _blob(f"{bucket}/run/writer.lock").exists()


def _stale_lock(url: str) -> None:
    """A lock left by a job on another host (its heartbeat judged by its age)."""
    _blob(f"{url}/writer.lock").upload_from_string(json.dumps(
        {"host": "another-host", "pid": 1, "started": time.time(), "token": "dead"}))


def test_two_takers_of_a_stale_lock_one_wins_at_the_precondition(bucket):
    url = f"{bucket}/run"
    _stale_lock(url)
    time.sleep(0.3)
    a, b = BucketWriterLock(url, lease_s=0.2), BucketWriterLock(url, lease_s=0.2)
    # Both read the same stale generation and judge it stale ...
    for lock in (a, b):
        holder, age_s = lock._read()
        assert lock._stale_reason(holder, age_s).startswith("no heartbeat")
    assert a._seen_generation == b._seen_generation
    # ... and both try to replace it: the generation precondition lets exactly one win.
    assert [a._take_over(holder), b._take_over(holder)] == [True, False]
    assert json.loads(_blob(f"{url}/writer.lock").download_as_bytes())["token"] == a.token


def test_stale_lock_takeover_race_between_two_processes(bucket, gcs):
    url = f"{bucket}/run"
    _stale_lock(url)
    time.sleep(0.3)
    start_at = time.time() + 4.0  # Both processes imported and waiting by then.
    script = textwrap.dedent(f"""
        import time
        from matlm.model_dir.lock import BucketWriterLock, LockHeldError
        lock = BucketWriterLock({url!r}, lease_s=0.2, heartbeat_s=60)
        time.sleep(max(0.0, {start_at} - time.time()))
        try:
            lock.acquire()
            print("WON", flush=True)
            time.sleep(3)  # Hold it while the other one decides.
            lock.release()
        except LockHeldError as e:
            print("REFUSED", e, flush=True)
    """)
    env = {**os.environ, **gcs.env}
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    # The winner also prints the takeover warning (naming the stale owner) first.
    results = sorted(next((line.split()[0] for line in out.splitlines()
                           if line.split()[:1] in (["WON"], ["REFUSED"])), f"ERR {err[-300:]}")
                     for out, err in outs)
    assert results == ["REFUSED", "WON"], outs
    winner = next(out for out, _ in outs if "WON" in out)
    assert "took over the stale writer lock" in winner and "another-host" in winner
    refused = next(out for out, _ in outs if out.startswith("REFUSED"))
    assert "is being written by another job" in refused or "at the same time" in refused


def test_an_owner_whose_lock_was_taken_over_stops(bucket):
    url = f"{bucket}/run"
    owner = BucketWriterLock(url, heartbeat_s=0.05).acquire()
    _blob(f"{url}/writer.lock").upload_from_string(b'{"token": "someone-else"}')
    deadline = time.time() + 10
    while owner.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(LockError, match="lost the writer lock"):
        owner.ensure_held()
    owner.release()  # Leaves the other owner's lock in place.
    assert json.loads(_blob(f"{url}/writer.lock").download_as_bytes())["token"] == "someone-else"


def test_an_owner_whose_heartbeat_the_bucket_refuses_stops_as_an_environment_fault(bucket, gcs,
                                                                                   caplog):
    url = f"{bucket}/run"
    owner = BucketWriterLock(url, heartbeat_s=0.05).acquire()
    with gcs.refusing(*gcs_emulator.WRITE):  # Write access revoked under the job.
        deadline = time.time() + 10
        while owner.lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockRefreshError) as refused:
            owner.ensure_held()
        owner.release()  # Cannot delete it either: a warning.
    assert refused.value.errno == errno.EACCES  # The CLI: exit 74, not 2 (another job).
    assert str(refused.value) == (
        f"could not refresh the writer lock {url}/writer.lock (this job may no longer write "
        f"it): stopping without saving, as another job may take a lock without heartbeats "
        f"over. Restore write access to {url}, then run the same command")
    assert "could not remove the writer lock" in caplog.text
    # Still ours, so the next job (here: of this process) takes it over without waiting.
    assert json.loads(_blob(f"{url}/writer.lock").download_as_bytes())["token"] == owner.token
    writer_lock(url).acquire().release()
    assert not _blob(f"{url}/writer.lock").exists()


# --- Checkpoints on a bucket. --------------------------------------------------------------------
def test_a_flipped_byte_in_an_array_object_is_set_aside(bucket, capsys):
    import jax
    import jax.numpy as jnp
    from matlm.model_dir import RunCheckpointer
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    url = f"{bucket}/run"

    def state(scale):
        params = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * scale}
        return types.SimpleNamespace(params=params, opt_state={"mu": params["w"] + 1})

    checkpointer = RunCheckpointer(url, async_save=False)
    for step, scale in ((1, 1.0), (2, 2.0)):
        checkpointer.save(step, state(scale), {"epoch": step}, {"step": step})
    checkpointer.wait()
    assert checkpointer.steps() == [1, 2]
    # Flip one byte in the middle of the largest params data object of step 2.
    client = storage.gcs_client()
    blobs = [b for b in client.list_blobs(bucket[5:], prefix="run/checkpoints/2/params/")
             if "/d/" in b.name]
    target = max(blobs, key=lambda b: b.size)
    data = bytearray(target.download_as_bytes())
    data[len(data) // 2] ^= 0x40
    target.upload_from_string(bytes(data))

    as_abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    abstract = types.SimpleNamespace(params=as_abstract(state(1.0).params),
                                     opt_state=as_abstract(state(1.0).opt_state))
    restored = RunCheckpointer(url, async_save=False).restore_latest(abstract)
    assert restored is not None and restored[-1] == 1  # The previous checkpoint.
    np.testing.assert_array_equal(np.asarray(restored[0]["w"]),
                                  np.asarray(state(1.0).params["w"]))
    assert "moved aside to 2.corrupt" in capsys.readouterr().out
    names = {b.name for b in client.list_blobs(bucket[5:], prefix="run/checkpoints/")}
    assert not any(n.startswith("run/checkpoints/2/") for n in names)
    assert "run/checkpoints/2.corrupt/commit_success.txt" in names
    assert [p.name for p in ModelDir(url).set_aside_checkpoints()] == ["2.corrupt"]
    assert ModelDir(url).checkpoint_steps() == [1]
    # A save cut short (killed before Orbax wrote its commit marker) is not a checkpoint:
    # on a bucket "complete" is the marker, not a rename.
    client.bucket(bucket[5:]).blob("run/checkpoints/1/commit_success.txt").delete()
    assert ModelDir(url).checkpoint_steps() == []


def test_a_save_killed_before_its_commit_marker_is_redone_by_the_next_job(bucket):
    import jax
    import jax.numpy as jnp
    from matlm.model_dir import RunCheckpointer
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    url, client = f"{bucket}/run", storage.gcs_client()

    def state(scale):
        params = {"w": jnp.arange(256, dtype=jnp.float32).reshape(16, 16) * scale}
        return types.SimpleNamespace(params=params, opt_state={"mu": params["w"] + 1})

    first = RunCheckpointer(url)  # Asynchronous saves, as in training.
    for step in (1, 2):
        first.save(step, state(float(step)), {"epoch": step}, {"step": step})
    first.wait()
    # Killed during the save of step 2: every object but the commit marker was written.
    client.bucket(bucket[5:]).blob("run/checkpoints/2/commit_success.txt").delete()
    second = RunCheckpointer(url)  # The next job: the partial step is not listed ...
    assert second.steps() == [1]
    # ... and removed by Orbax's cleanup, which runs in the background (awaited before
    # the first save): polled, not read at once.
    deadline = time.time() + 60
    while list(client.list_blobs(bucket[5:], prefix="run/checkpoints/2/")):
        assert time.time() < deadline, "the partial step 2 was never removed"
        time.sleep(0.1)
    second.save(2, state(3.0), {"epoch": 2}, {"step": 2})  # ... and saved again.
    second.wait()
    as_abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    restored = RunCheckpointer(url).restore_latest(types.SimpleNamespace(
        params=as_abstract(state(1.0).params), opt_state=as_abstract(state(1.0).opt_state)))
    assert restored[-1] == 2
    np.testing.assert_array_equal(np.asarray(restored[0]["w"]), np.asarray(state(3.0).params["w"]))


# --- Training on a bucket. ---------------------------------------------------------------------
def _train_rows(text: str) -> dict:
    rows = [json.loads(line) for line in text.splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.usefixtures("one_device")
def test_train_on_a_bucket_stopped_and_resumed_equals_a_local_run(bucket, tmp_path, wiki_vocab,
                                                                  capsys):
    import jax
    from matlm import data
    from matlm.model import ModelConfig
    from matlm.model_dir import load_checkpoint_for_inference
    from matlm.training.config import TrainConfig
    from matlm.training.trainer import train
    model = ModelConfig(vocab_size=2048, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    config = TrainConfig(steps=4, seq_len=32, global_batch_size=4, warmup_steps=2,
                         log_every=1, eval_every=0, eval_batches=1, checkpoint_every=2,
                         mesh_shape=(1, 1, 1))
    data_config = data.DataConfig(task="matlm_wiki")
    url, local = f"{bucket}/run", tmp_path / "continuous"
    # The reference: one job on a local dir.
    train(model, data_config, config, local, vocab=wiki_vocab, show_progress=False)
    # On the bucket: stopped at step 2 (as if preempted), then resumed.
    stopped = train(model, data_config, config, url, vocab=wiki_vocab, show_progress=False,
                    stop_at=2)
    assert stopped.interrupted and stopped.final_step == 2
    resumed = train(model, data_config, config, url, vocab=wiki_vocab, show_progress=False)
    assert resumed.final_step == 4
    assert f"resumed from {url}/checkpoints/2" in capsys.readouterr().out
    on_bucket = ModelDir(url)
    assert _train_rows(on_bucket.metrics_file.read_text()) == \
        _train_rows((local / "metrics.jsonl").read_text())  # Bit for bit.
    assert on_bucket.checkpoint_steps() == [2, 4]
    assert not _blob(f"{url}/writer.lock").exists()  # Released.
    a, b = (load_checkpoint_for_inference(d).params for d in (local, url))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    # Readers from the bucket: verify, and eval (its results written locally, --output).
    assert matlm_main(["verify", f"--model_dir={url}"]) == 0
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["status"] == "ok" and verdict["ok"] == [2, 4]
    for where, out in ((url, tmp_path / "eval_bucket"), (local, tmp_path / "eval_local")):
        assert matlm_main(["eval", f"--model_dir={where}", "--tasks=loss", "--no_progress",
                           "--no_plots", f"--output={out}"]) == 0
    # Without --output, into the bucket's eval/<step>/ (results, table and a plot).
    assert matlm_main(["eval", f"--model_dir={url}", "--tasks=loss", "--no_progress"]) == 0
    capsys.readouterr()
    results = [json.loads((d / "results.json").read_text())["tasks"]
               for d in (tmp_path / "eval_bucket", tmp_path / "eval_local",
                         on_bucket.eval_dir(4))]
    assert results[0] == results[1] == results[2]
    assert _blob(f"{url}/eval/4/results.md").exists()
    assert any(p.name.endswith("_vs_params.png") for p in on_bucket.eval_dir(4).iterdir())
