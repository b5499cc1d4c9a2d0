"""`matlm compile` and the memory check for the MatViT family (a family without tokens):
the image batch sharded as the trainer shards it, work counted in patches and FLOPs by
matlm.model.counting's per-image count, the memory estimate against XLA's buffers, bad
input refused before compiling, and the ImageNet recipes' memory estimate on the slices
they name. Each compile is a 1-layer tiny ViT: the real recipes' compiles (about 3 and 5
minutes on 2 cores) are `python scripts/check_recipes_fit.py`'s, as the LM recipes' are."""
import json
import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from matlm.cli.main import main
from matlm.gin_config import model_config_from_gin, parse_gin, train_config_from_gin
from matlm.model.counting import joint_forward_flops_per_image
from matlm.model.vit_config import ViTConfig
from matlm.training.config import TrainConfig
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import abstract_state, make_train_step

TINY = "configs/models/matvit_tiny.gin"  # 28×28×1 in 4×4 patches: 49 patches + class token.
SMALL_FLAGS = ["--gin.ViTConfig.n_layers=1", "--gin.TrainConfig.global_batch_size=8"]
RECIPES = ["configs/runs/imagenet_matvit_b16.gin", "configs/runs/imagenet_matvit_l16.gin"]


def compile_cli(capsys, *args):
    """(exit code, stdout, stderr, the JSON last line or None)."""
    rc = main(["compile", *args])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, out, err, (json.loads(lines[-1]) if rc in (0, 1) else None)


def _image_batch(config: ViTConfig, B: int, sharding) -> dict:
    """The ViT's batch, written out here (not fit_check's): images [B, H, W, C] float32,
    labels [B] int32, mask [B] float32, each split over its leading axis."""
    return {"images": jax.ShapeDtypeStruct((B, *config.image_shape), jnp.float32,
                                           sharding=sharding),
            "labels": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=sharding),
            "mask": jax.ShapeDtypeStruct((B,), jnp.float32, sharding=sharding)}


def test_vit_on_a_tpu_topology_peak_flops_and_patches(tmp_path, capsys):
    recipe = tmp_path / "tiny_vit_run.gin"
    recipe.write_text(f"# slice: v5e:2x2\ninclude '{TINY}'\n")
    rc, out, err, result = compile_cli(capsys, f"--gin_file={recipe}", "--skip_eval",
                                       *SMALL_FLAGS)
    assert rc == 0, err
    assert result["devices"] == 4 and result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert result["fits"] is True and result["meets_min_headroom"] is True
    assert result["token_unit"] == "patches" and result["examples_per_step"] == 8
    assert result["tokens_per_step"] == 8 * 7 * 7  # 28/4 = 7 patches a side.
    assert "8 images × 49 patches = 392 patches per step" in out

    # The same step compiled here on the same chips, with the batch written out by hand
    # and split over the 4 data shards.
    parse_gin([TINY], ["ViTConfig.n_layers = 1", "TrainConfig.global_batch_size = 8"])
    model_config, train_config = model_config_from_gin(), train_config_from_gin()
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    from matlm.training.mesh import make_mesh
    mesh = make_mesh((-1, 1, 1), devices=devices)
    optimizer = make_optimizer(train_config)
    step = make_train_step(model_config, build_objective(model_config, train_config),
                           optimizer, learning_rate_schedule(train_config), mesh)
    batch = _image_batch(model_config, 8, NamedSharding(mesh, P("data")))
    compiled = step.lower(abstract_state(model_config, optimizer, mesh), batch).compile()
    m = compiled.memory_analysis()
    assert result["peak_bytes_per_device"] == (
        m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    assert result["train_step"]["argument"] == m.argument_size_in_bytes
    # FLOPs: 3 × the joint forward pass of one image (counting.py, per image) × images.
    widths = [model_config.granularities.uniform(n) for n in ("S", "M", "L", "XL")]
    expected = 8 * 3 * joint_forward_flops_per_image(model_config, widths)
    assert result["flops_per_step"] == pytest.approx(expected)
    # With one layer nothing is scanned away: XLA's count (matmuls and elementwise work)
    # is the same order as matlm's matmul count.
    assert 0.9 < result["xla_flops_per_step"] / expected < 1.5


def test_vit_on_local_devices_with_the_eval_step(capsys):
    rc, _, err, result = compile_cli(capsys, f"--gin_file={TINY}", "--topology=local",
                                     *SMALL_FLAGS, "--gin.TrainConfig.mesh_shape=(2, 4, 1)")
    assert rc == 0, err
    assert result["devices"] == 8 and result["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    evaluation = result["eval_step"]
    assert evaluation["resident_peak"] > evaluation["peak"] > 0
    assert result["peak_bytes_per_device"] == max(result["train_step"]["peak"],
                                                   evaluation["resident_peak"])


@pytest.mark.parametrize("binding, message", [
    ("--gin.TrainConfig.global_batch_size=6", "is not divisible by data×fsdp = 4"),
    ("--gin.TrainConfig.granularities=('XXL',)", "are not granularities of the model"),
])
def test_bad_vit_input_is_one_line_before_compiling(capsys, binding, message):
    rc, out, err, _ = compile_cli(capsys, f"--gin_file={TINY}", "--topology=v5e:2x2",
                                  *SMALL_FLAGS, binding)
    assert rc == 2 and out == "" and "compiling" not in err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("remat", ["minimal", "full"])
def test_vit_memory_estimate_against_the_compiled_step(remat):
    """Parameters and optimizer state exactly as XLA's argument buffers (less the batch
    and the step counter); activations + gradients within 2× of its temporaries. The
    TrainConfig.seq_len is far from the ViT's 65 tokens: the estimate must not read it."""
    from matlm.launch.fit_check import bytes_per_device, lower_train_step
    from matlm.training.memory_check import estimate
    from matlm.training.mesh import make_mesh
    vit = ViTConfig(image_size=32, patch_size=4, num_channels=3, num_classes=10, d_model=64,
                    n_layers=4, n_heads=4, d_ff=256, width_alignment=8, scan_layers=True,
                    remat_policy=remat)
    train = TrainConfig(global_batch_size=8, seq_len=2048, mesh_shape=(1, 1, 1))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    result = estimate(vit, train, mesh)
    step, args, _ = lower_train_step(vit, train, mesh)
    m = step.lower(*args).compile().memory_analysis()
    batch = bytes_per_device(args[1])
    assert batch == 8 * (32 * 32 * 3 * 4 + 4 + 4)
    assert m.argument_size_in_bytes == result.params_bytes + result.optimizer_bytes + batch + 4
    ratio = m.temp_size_in_bytes / (result.activation_bytes + result.gradient_bytes)
    assert 0.5 < ratio < 2.0, (remat, m.temp_size_in_bytes, result.describe())


def _one_device_mesh():
    from matlm.training.mesh import make_mesh
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_vit_memory_check_refuses_what_cannot_fit():
    from matlm.training.memory_check import MemoryCheckError, estimate
    from jax.sharding import AbstractMesh, AxisType
    vit = ViTConfig(image_size=224, patch_size=16, num_classes=1000, d_model=768,
                    n_layers=12, n_heads=12, d_ff=3072)
    mesh = AbstractMesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    small = estimate(vit, TrainConfig(global_batch_size=8), mesh, available=16 << 30,
                     platform="tpu")
    big = estimate(vit, TrainConfig(global_batch_size=4096), mesh, available=16 << 30,
                   platform="tpu")
    assert small.fits and not big.fits
    # Every activation term is per image: 512× the images, 512× the bytes; the state is not.
    assert big.activation_bytes == pytest.approx(512 * small.activation_bytes, rel=1e-6)
    assert big.params_bytes == small.params_bytes
    from matlm.training import memory_check
    with pytest.raises(MemoryCheckError, match="does not fit the local devices' memory"):
        memory_check.check_fits_local_memory(
            vit, TrainConfig(global_batch_size=1 << 20, mesh_shape=(1, 1, 1)),
            _one_device_mesh())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.split("/")[-1][:-4])
def test_imagenet_recipes_pass_the_estimate_on_their_slice(recipe):
    from jax.sharding import AbstractMesh, AxisType
    from matlm.data.image_config import image_data_config_from_gin
    from matlm.launch.topology import parse_topology, slice_from_gin_files
    from matlm.training.memory_check import estimate
    chip, grid = parse_topology(slice_from_gin_files([recipe]))
    parse_gin([recipe])
    model, train = model_config_from_gin(), train_config_from_gin()
    assert isinstance(model, ViTConfig) and model.image_size == 224
    assert image_data_config_from_gin().dataset == "imagenet2012"
    assert train.granularity_mode == "all" and len(build_objective(model, train).names) == 4
    chips = math.prod(grid)
    shape = tuple(chips // -math.prod(train.mesh_shape) if s == -1 else s
                  for s in train.mesh_shape)
    mesh = AbstractMesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    result = estimate(model, train, mesh, available=chip.hbm_bytes, platform="tpu")
    assert result.total_bytes <= 0.85 * chip.hbm_bytes, result.describe()
