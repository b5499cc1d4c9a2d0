"""Validation of granularities, width vectors and gin input; every model config builds."""
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from matlm.cli.main import main as matlm_main
from matlm.gin_config import ConfigError, model_config_from_gin, parse_gin
from matlm.model import (GranularityError, GranularitySpec, ModelConfig, ModelConfigError,
                         abstract_params, param_count)
from matlm.model.counting import forward_flops_per_token, joint_forward_flops_per_token

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((REPO / "configs" / "models").glob("*.gin"))


def spec(**kw):
    base = dict(d_ff=512, n_layers=4, alignment=8)
    return GranularitySpec(**{**base, **kw})


def test_default_ladder_is_the_papers():
    assert spec().by_name == {"S": 64, "M": 128, "L": 256, "XL": 512}


@pytest.mark.parametrize("kwargs, message", [
    (dict(widths=(64, 256, 128, 512)), "strictly increasing"),
    (dict(widths=(64, 128, 256, 256)), "strictly increasing"),
    (dict(widths=(64, 128, 256, 384)), "must use the full FFN"),
    (dict(widths=(0, 128, 256, 512)), "must be positive"),
    (dict(widths=(64, 128, 256, 1024)), "exceeds d_ff=512"),
    (dict(widths=(60, 128, 256, 512)), "not a multiple of the alignment 8"),
    (dict(widths=(64, 512)), "4 granularity names"),
    (dict(names=("S", "S", "L", "XL")), "unique"),
])
def test_invalid_granularities_are_named(kwargs, message):
    with pytest.raises(GranularityError, match=message):
        spec(**kwargs)


def test_width_vectors_resolve_names_and_integers():
    s = spec()
    assert s.resolve("M") == (128,) * 4
    assert s.resolve(256) == (256,) * 4
    assert s.resolve("S,XL,96,L") == (64, 512, 96, 256)
    assert s.resolve(["S", 512, "M", 8]) == (64, 512, 128, 8)


@pytest.mark.parametrize("value, message", [
    ("S,M,L", "3 entries but the model has 4 layers"),
    ("S,M,L,XL,S", "5 entries"),
    ("S,Q,L,XL", "layer 1: unknown granularity 'Q'"),
    ("S,M,0,XL", "layer 2: width 0 must be positive"),
    ("S,M,L,1024", "layer 3: width 1024 exceeds d_ff=512"),
    ("S,M,L,100", "layer 3: width 100 is not a multiple of the alignment 8"),
    ("", "empty"),
])
def test_invalid_width_vectors_are_named(value, message):
    with pytest.raises(GranularityError, match=message):
        spec().resolve(value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "not a multiple of n_kv_heads"),
    (dict(activation="tanh"), "ModelConfig.activation must be one of 'gelu', .*, got 'tanh'"),
    (dict(compute_dtype="float16"), "ModelConfig.compute_dtype must be one of"),
    (dict(d_ff=0), r"ModelConfig.d_ff must be an integer >= 1, got 0"),
    (dict(granularity_widths=(32, 16, 128, 256)), "strictly increasing"),
    (dict(attention_query_block=-64),
     "ModelConfig.attention_query_block must be an integer >= 0, got -64"),
])
def test_invalid_model_configs_are_named(kwargs, message):
    with pytest.raises((ModelConfigError, GranularityError), match=message):
        ModelConfig(**kwargs)


def test_unknown_gin_binding_is_named():
    with pytest.raises(ConfigError, match="ModelConfig.dmodel"):
        parse_gin(["configs/models/tiny.gin"], ["ModelConfig.dmodel = 3"])


def test_missing_gin_file_is_named():
    with pytest.raises(ConfigError, match="no_such_model.gin"):
        parse_gin(["configs/models/no_such_model.gin"])


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_every_model_config_builds_abstractly(path):
    parse_gin([str(path)])
    config = model_config_from_gin()
    shapes = abstract_params(config)  # jax.eval_shape: no allocation.
    assert sum(x.size for x in jax.tree.leaves(shapes)) == param_count(config)
    if path.stem.startswith("matlm_"):  # The paper family: size within 3 % of its name.
        name = path.stem.split("_")[1]
        target = float(name[:-1]) * (1e9 if name.endswith("b") else 1e6)
        assert abs(param_count(config) / target - 1) < 0.03, (name, param_count(config))
        assert all(w % 128 == 0 for w in config.granularities.widths)


def test_info_prints_the_table(capsys):
    assert matlm_main(["info", "--gin_file=configs/models/matlm_2.6b.gin", "--widths=640",
                       "--gin.ModelConfig.n_layers=2", "--widths=S,XL"]) == 0
    out = capsys.readouterr().out
    assert "│ family " in out and "│ lm " in out and "│ rope " in out
    parse_gin(["configs/models/matlm_2.6b.gin"], ["ModelConfig.n_layers = 2"])
    config = model_config_from_gin()
    for name in ("S", "M", "L", "XL"):
        count = param_count(config, config.granularities.uniform(name))
        assert f"│ {name} " in out and f"{count:,}" in out
    assert f"{param_count(config, (1280, 10240)):,}" in out  # The mix S,XL.
    assert f"{param_count(config, (640, 640)):,}" in out
    vectors = [config.granularities.uniform(n) for n in config.granularities.names]
    saving = (joint_forward_flops_per_token(config, 2048, vectors)
              / sum(forward_flops_per_token(config, 2048, w) for w in vectors))
    assert saving < 1 and f"{saving:.3f} of the granularities run one by one" in out


def test_info_reports_bad_input_with_exit_code_2(capsys):
    assert matlm_main(["info", "--widths=S,M"]) == 2
    assert "2 entries but the model has 4 layers" in capsys.readouterr().err
    assert matlm_main(["info", "--gin.ModelConfig.dmodel=3"]) == 2
    assert "dmodel" in capsys.readouterr().err


def test_core_runs_without_tensorflow():
    # Blocks TensorFlow and seqio imports, then builds, runs and counts a model.
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow', 'seqio', 'tensorflow_datasets'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import jax, jax.numpy as jnp
from matlm.model import MatLM, ModelConfig, init_params
import matlm.sharding, matlm.cli.info, matlm.cli.main
c = ModelConfig()
p = init_params(c, jax.random.key(0))
print(MatLM(c).apply({'params': p}, jnp.zeros((1, 4), jnp.int32), widths=(32, 64)).shape)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "(1, 4, 256)" in out.stdout


RUN_CONFIGS = sorted((REPO / "configs" / "runs").glob("*.gin"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_run_config_validates(path):
    from matlm import data
    from matlm.gin_config import train_config_from_gin
    from matlm.training.objective import build_objective
    parse_gin([str(path)])
    model_config, train_config = model_config_from_gin(), train_config_from_gin()
    objective = build_objective(model_config, train_config)
    assert abs(sum(objective.weights) - 1) < 1e-9  # Mean of the granularities' losses.
    from matlm.model import family_of
    if family_of(model_config).tokens:
        assert data.data_config_from_gin().task in data.registered_names()
    else:  # An image run: an offline set or a TFDS one.
        from matlm.data import image_sets
        from matlm.data.image_config import TFDS_IMAGE_SETS
        dataset = data.image_data_config_from_gin().dataset
        assert dataset in TFDS_IMAGE_SETS or image_sets.check_image_set(dataset)
    tensor = train_config.mesh_shape[2]
    if tensor > 1:  # Shard-local nesting needs whole nesting blocks per tensor shard.
        assert model_config.ffn_nest_blocks % tensor == 0


# ---- model families: the body/family split and the registry --------------------------------

def test_model_config_is_the_lm_family_on_the_shared_body():
    from matlm.model import BodyConfig, MatLM, build_model, family_of
    config = ModelConfig(d_model=32, n_heads=2, vocab_size=100, tie_embeddings=False)
    assert isinstance(config, BodyConfig) and family_of(config).name == "lm"
    assert isinstance(build_model(config), MatLM)
    body = config.body
    assert type(body) is BodyConfig and body.d_model == 32 and not hasattr(body, "vocab_size")
    # The body's checks name the family's class, as gin binds it.
    with pytest.raises(ModelConfigError, match="ModelConfig.d_model must be an integer >= 1"):
        ModelConfig(d_model=0)
    with pytest.raises(ModelConfigError, match="must be even for RoPE"):
        ModelConfig(d_model=12, n_heads=4)
    ModelConfig(d_model=12, n_heads=4, position_encoding="none")  # No RoPE, no constraint.


def test_old_model_dicts_load_through_the_registry():
    """A run_config.json model section written before families (no "family") is the LM's;
    missing fields take their defaults, unknown ones are listed, and the round trip holds."""
    import dataclasses
    from matlm.model import families
    old = {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
           "rope_theta": 500.0, "from_the_future": 1}
    config, unknown = families.config_from_dict(old)
    assert type(config) is ModelConfig and config.vocab_size == 512
    assert config.position_encoding == "rope" and unknown == ["from_the_future"]
    d = families.config_to_dict(config)
    assert d["family"] == "lm" and families.config_from_dict(d) == (config, [])
    assert {k for k in d if k != "family"} == {f.name for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(ModelConfigError, match="unknown model family 'audio'"):
        families.config_from_dict({"family": "audio"})


def test_gin_binds_the_lm_config_through_the_registry():
    parse_gin([], ["ModelConfig.d_model = 48", "ModelConfig.n_heads = 3",
                   "ModelConfig.position_encoding = 'learned'"])
    config = model_config_from_gin()
    assert type(config) is ModelConfig
    assert (config.d_model, config.position_encoding) == (48, "learned")
