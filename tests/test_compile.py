"""`matlm compile`: the AOT fit check, for a small TPU topology (libtpu describes the chips,
no hardware) and for the 8 fake CPU devices. Each compile is a 1-layer tiny model."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.cli.main import main
from matlm.gin_config import model_config_from_gin, parse_gin, train_config_from_gin
from matlm.launch import topology as topology_lib
from matlm.training.mesh import batch_sharding, make_mesh
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import abstract_state, make_train_step

SMALL = ["ModelConfig.n_layers = 1", "ModelConfig.vocab_size = 512",
         "TrainConfig.seq_len = 32", "TrainConfig.global_batch_size = 4"]
SMALL_FLAGS = ["--gin." + b.replace(" = ", "=") for b in SMALL]


def compile_cli(capsys, *args):
    """(exit code, stdout, stderr, the JSON last line or None)."""
    rc = main(["compile", *args])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, out, err, (json.loads(lines[-1]) if rc in (0, 1) else None)


def test_tpu_topology_peak_equals_memory_analysis(tmp_path, capsys):
    # The recipe names its slice in its header comment; no --topology flag.
    recipe = tmp_path / "tiny_run.gin"
    recipe.write_text("# A tiny recipe.\n# slice: v5e:2x2\ninclude 'configs/models/tiny.gin'\n")
    rc, out, _, result = compile_cli(capsys, f"--gin_file={recipe}", "--skip_eval",
                                     *SMALL_FLAGS)
    assert rc == 0
    assert result["topology"] == "v5e:2x2" and result["devices"] == 4
    assert result["hbm_bytes_per_device"] == int(15.75 * 2 ** 30)
    assert result["fits"] is True and result["meets_min_headroom"] is True
    assert "fits with" in out and "does not fit" not in out

    # The same step compiled here, independently of matlm.launch.
    parse_gin(["configs/models/tiny.gin"], SMALL)
    model_config, train_config = model_config_from_gin(), train_config_from_gin()
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = make_mesh((-1, 1, 1), devices=devices)
    optimizer = make_optimizer(train_config)
    step = make_train_step(model_config, build_objective(model_config, train_config),
                           optimizer, learning_rate_schedule(train_config), mesh)
    sharding = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((4, 32), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=sharding)
             for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    compiled = step.lower(abstract_state(model_config, optimizer, mesh), batch).compile()
    m = compiled.memory_analysis()
    expected = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    assert m.alias_size_in_bytes > 0  # The state is donated: its buffers are reused.
    assert result["peak_bytes_per_device"] == expected
    assert result["train_step"]["temp"] == m.temp_size_in_bytes
    assert result["headroom"] == pytest.approx(1 - expected / (15.75 * 2 ** 30))
    assert result["xla_flops_per_step"] == pytest.approx(4 * compiled.cost_analysis()["flops"])
    # The headline FLOPs are matlm's exact count of the joint pass, as MFU uses them.
    from matlm.model.counting import joint_train_flops_per_token
    joint = joint_train_flops_per_token(model_config, 32, [model_config.granularities.uniform(n)
                                                           for n in ("S", "M", "L", "XL")])
    assert result["flops_per_step"] == pytest.approx(4 * 32 * joint)
    assert result["tokens_per_step"] == 4 * 32


def test_oversized_model_does_not_fit(capsys):
    # A 2M-token vocabulary at d_model 1024: 8 GiB of tied embeddings, 24 GiB with Adam's
    # moments, replicated under data parallelism: more than a v5e chip's 15.75 GiB.
    rc, out, _, result = compile_cli(
        capsys, "--gin_file=configs/models/tiny.gin", "--topology=v5e:2x2", "--skip_eval",
        *SMALL_FLAGS, "--gin.ModelConfig.vocab_size=2097152", "--gin.ModelConfig.d_model=1024")
    assert rc == 1
    assert result["fits"] is False and result["meets_min_headroom"] is False
    assert result["peak_bytes_per_device"] > 24 * 2 ** 30
    assert result["xla_flops_per_step"] is None  # libtpu stopped the compile: no cost analysis.
    assert result["headroom"] < 0
    excess = (result["peak_bytes_per_device"] - result["hbm_bytes_per_device"]) / 2 ** 30
    assert f"does not fit by {excess:.2f} GiB" in out


def test_local_devices_with_eval_step(capsys):
    rc, out, err, result = compile_cli(capsys, "--gin_file=configs/models/tiny.gin",
                                       "--topology=local", *SMALL_FLAGS,
                                       "--gin.TrainConfig.global_batch_size=8")
    assert rc == 0, err
    assert result["topology"] == "local" and result["devices"] == len(jax.devices()) == 8
    assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    # While the eval step runs, the optimizer state stays resident: Adam's two moments,
    # replicated under pure data parallelism, i.e. twice the parameter bytes (+ counts).
    parse_gin(["configs/models/tiny.gin"], SMALL)
    optimizer = make_optimizer(train_config_from_gin())
    import flax.linen
    from matlm.model import abstract_params
    params = flax.linen.meta.unbox(abstract_params(model_config_from_gin()))
    opt_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(jax.eval_shape(optimizer.init, params)))
    evaluation = result["eval_step"]
    assert evaluation["resident_peak"] == evaluation["peak"] + opt_bytes
    assert result["peak_bytes_per_device"] == max(result["train_step"]["peak"],
                                                   evaluation["resident_peak"])


@pytest.mark.parametrize("topology, message", [
    ("v7x:2x2", "unknown topology 'v7x:2x2'; accepted: local, or CHIP:GRID"),
    ("v5e-16", "unknown topology 'v5e-16'"),
    ("v5e:2x2x2", "v5e slices have a 2-D chip grid"),
])
def test_unknown_topology_is_one_line_exit_2(capsys, topology, message):
    rc, out, err, _ = compile_cli(capsys, "--gin_file=configs/models/tiny.gin",
                                  f"--topology={topology}")
    assert rc == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("binding, message", [
    ("--gin.TrainConfig.mesh_shape=(3, 1, 1)", "does not divide the 4 available devices"),
    ("--gin.TrainConfig.global_batch_size=6", "is not divisible by data×fsdp = 4"),
])
def test_mesh_or_batch_that_does_not_divide_is_refused_before_compiling(capsys, binding, message):
    rc, out, err, _ = compile_cli(capsys, "--gin_file=configs/models/tiny.gin",
                                  "--topology=v5e:2x2", *SMALL_FLAGS, binding)
    assert rc == 2 and "compiling" not in err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_topology_and_missing_libtpu(capsys, monkeypatch):
    rc, _, err, _ = compile_cli(capsys, "--gin_file=configs/models/tiny.gin")
    assert rc == 2 and "no topology: pass --topology=v5e:4x4" in err
    monkeypatch.setattr(topology_lib, "libtpu_installed", lambda: False)
    rc, _, err, _ = compile_cli(capsys, "--gin_file=configs/models/tiny.gin",
                                "--topology=v5e:2x2")
    assert rc == 2 and 'pip install -e ".[tpu]"' in err


@pytest.mark.parametrize("family", sorted(topology_lib.CHIPS))
def test_hbm_table_matches_what_libtpu_reports(family):
    """libtpu names the HBM it allows per device when a program needs more: the table must
    agree with it (a libtpu upgrade that changes it fails here)."""
    chip = topology_lib.CHIPS[family]
    grid = "2x2" if chip.grid_dims == 2 else "2x2x1"  # The smallest slices (one host).
    target = topology_lib.make_target(f"{family}:{grid}")
    mesh = jax.sharding.Mesh(np.array(target.devices), ("d",))
    too_big = jax.jit(lambda: jnp.zeros((1 << 17, 1 << 18), jnp.float32),  # 128 GiB
                      out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as error:
        too_big.lower().compile()
    reported = re.search(r"exceeds available HBM \(([\d.]+)G\)", str(error.value))
    assert reported, str(error.value)
    assert chip.hbm_bytes == int(float(reported.group(1)) * 2 ** 30)
