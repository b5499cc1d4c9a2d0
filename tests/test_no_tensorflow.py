"""The core runs where TensorFlow, seqio and TFDS are not installed (the GPU image: issue
29): one subprocess, with them hidden, builds a model, runs a joint train step, KV-cache and
speculative decoding, imports the benchmarks and the GPU check, and (gin-config is a small
wheel that can be carried) runs `matlm compile --topology=local`."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("tensorflow", "seqio", "tensorflow_datasets")

# Installed as sitecustomize, so that child processes are hidden from the same packages.
# A missing package is one that `import` refuses and `importlib.util.find_spec` does not
# find (matlm.data asks find_spec before importing anything).
BLOCKER = '''
import importlib.util, os, sys
HIDDEN = set(os.environ["MATLM_HIDE_MODULES"].split(","))
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
sys.meta_path.insert(0, _Hide())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in HIDDEN:
        return None
    return _find_spec(name, package)
importlib.util.find_spec = find_spec
'''


def hidden_env(directory: Path, hidden=HIDDEN) -> dict:
    """The environment of a child process that cannot see `hidden` packages (nor its own
    children): a sitecustomize on PYTHONPATH."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(directory), str(REPO), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, MATLM_HIDE_MODULES=",".join(hidden),
                JAX_PLATFORMS="cpu")


CODE = r'''
import json, os, sys
import numpy as np
try:
    import tensorflow  # noqa: F401
    raise SystemExit("tensorflow is not hidden")
except ModuleNotFoundError:
    pass
import jax, jax.numpy as jnp
sys.path.insert(0, "scripts")
results = {}

# The model and one joint train step (synthetic tokens), no gin either.
from matlm.model import ModelConfig, init_params
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import init_state, make_train_step
from benchmark_model import synthetic_token_batch
config = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_ff=64)
train = TrainConfig(seq_len=16, global_batch_size=2, mesh_shape=(1, 1, 1), steps=10,
                    warmup_steps=0)  # A first step that moves the parameters.
mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
optimizer = make_optimizer(train)
step = make_train_step(config, build_objective(config, train), optimizer,
                       learning_rate_schedule(train), mesh)
state = init_state(config, optimizer, mesh, seed=0)
before = jax.device_get(state.params["embedding"]).copy()
state, metrics = step(state, synthetic_token_batch(2, 16, 128, mesh))
results["loss"] = float(metrics["loss"])
results["params_moved"] = bool(np.any(jax.device_get(state.params["embedding"]) != before))

# KV-cache decoding and greedy speculative decoding (which must equal it token for token).
from matlm.decoding.generate import generate
from matlm.decoding.speculative import speculative_generate
params = init_params(config, jax.random.key(1))
prompt = [3, 17, 42, 9]
xl = config.granularities.uniform("XL")
plain = generate(params, config, [prompt], widths=xl, max_new_tokens=6)[0]
spec, stats = speculative_generate(params, config, [prompt], target_widths=xl,
                                   draft_widths=config.granularities.uniform("S"),
                                   draft_tokens=2, max_new_tokens=6, shared_cache=True)
results.update(plain=plain, speculative=spec[0], drafted=stats.drafted)

# The benchmarks and the GPU check import (their functions are what gpu_check calls).
import benchmark_train, benchmark_decode, benchmark_model, gpu_check  # noqa: F401
import matlm.cli.main, matlm.launch.fit_check, matlm.data.embedded_tokens  # noqa: F401
results["no_gin_yet"] = "gin" not in sys.modules

# `matlm compile --topology=local` (gin-config carried: allowed from here on).
os.environ["MATLM_HIDE_MODULES"] = ",".join(m for m in os.environ["MATLM_HIDE_MODULES"]
                                             .split(",") if m != "gin")
import sitecustomize
sitecustomize.HIDDEN.discard("gin")
from matlm.cli.main import main
import contextlib, io
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["compile", "--gin_file=configs/models/tiny.gin", "--topology=local",
               "--skip_eval", "--gin.ModelConfig.n_layers=1", "--gin.ModelConfig.vocab_size=512",
               "--gin.TrainConfig.seq_len=32", "--gin.TrainConfig.global_batch_size=1"])
results["compile_rc"] = rc
results["compile"] = json.loads(out.getvalue().strip().splitlines()[-1])
results["loaded"] = sorted(m for m in ("tensorflow", "seqio", "tensorflow_datasets")
                           if m in sys.modules)
print("RESULT " + json.dumps(results))
'''


def test_core_paths_run_with_tensorflow_and_seqio_hidden(tmp_path):
    env = hidden_env(tmp_path / "site", HIDDEN + ("gin",))
    env.pop("XLA_FLAGS", None)  # One CPU device: `--topology=local` compiles for it.
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["loaded"] == []
    assert r["no_gin_yet"], "the model, train step, decoding or benchmarks imported gin"
    assert np_isfinite(r["loss"]) and r["loss"] > 0 and r["params_moved"]
    assert len(r["plain"]) == 6 and r["speculative"] == r["plain"] and r["drafted"] > 0
    assert r["compile_rc"] == 0 and r["compile"]["topology"] == "local"
    assert r["compile"]["train_step"]["peak"] > 0


def np_isfinite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
