import pytest
import yaml

from dino_train.config import ConfigError, config_from_dict, load_config, save_config, scaled_lr, to_dict
from tests.helpers import REPO

DATA = ["data.path=/some/images"]


def test_defaults_are_the_original_release():
    cfg = load_config(None, DATA)
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.out_dim) == ("vit_small", 16, 65536)
    assert cfg.data.global_crops_scale == (0.4, 1.0) and cfg.data.local_crops_scale == (0.05, 0.4)
    assert (cfg.data.local_crops_number, cfg.data.local_crops_size, cfg.data.global_crops_size) == (
        8,
        96,
        224,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.0005, 0.04, 0.4)
    assert (cfg.dino.momentum_teacher, cfg.dino.teacher_temp, cfg.dino.student_temp) == (0.996, 0.04, 0.1)
    assert cfg.train.epochs == 100


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = load_config(REPO / "configs" / recipe, DATA)
    assert cfg.data.path == "/some/images"


def test_paper_recipe_values():
    cfg = load_config(REPO / "configs" / "paper_vit_small16.yaml", DATA)
    assert cfg.data.local_crops_number == 10
    assert cfg.data.global_crops_scale == (0.25, 1.0) and cfg.data.local_crops_scale == (0.05, 0.25)
    assert (cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp) == (0.04, 0.07)
    base = load_config(REPO / "configs" / "paper_vit_base16.yaml", DATA)
    assert base.model.arch == "vit_base" and base.data.local_crops_number == 10


def test_overrides_are_typed():
    cfg = load_config(
        None, DATA + ["optim.lr=1e-3", "data.local_crops_scale=[0.1, 0.3]", "model.norm_last_layer=false"]
    )
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.local_crops_scale == (0.1, 0.3)
    assert cfg.model.norm_last_layer is False
    cfg = load_config(None, DATA + ["optim.lr=1"])  # an int where a float is expected is fine
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("nosection.x=1", "nosection"),
        ("optim.lr=-0.1", "optim.lr"),
        ("optim.lr=abc", "optim.lr"),
        ("data.batch_size_per_gpu=1.5", "data.batch_size_per_gpu"),
        ("data.global_crops_scale=[0.4, 1.5]", "data.global_crops_scale"),
        ("data.local_crops_scale=[0.0, 0.4]", "data.local_crops_scale"),
        ("data.local_crops_scale=[0.5, 0.4]", "data.local_crops_scale"),
        ("data.global_crops_scale=0.4", "data.global_crops_scale"),
        ("data.solarize_p=[0.0, 1.2, 0.0]", "data.solarize_p"),
        ("data.solarize_p=[0.5, 0.5]", "data.solarize_p"),
        ("data.solarize_threshold=300", "data.solarize_threshold"),
        ("optim.warmup_epochs=200", "optim.warmup_epochs"),
        ("dino.warmup_teacher_temp_epochs=101", "dino.warmup_teacher_temp_epochs"),
        ("data.global_crops_size=100", "data.global_crops_size"),
        ("model.arch=resnet5000", "model.arch"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("dino.teacher_temp=.inf", "dino.teacher_temp"),
        ("train.dist_timeout_s=.inf", "train.dist_timeout_s"),
        ("model.timm_kwargs={depth: .inf}", "model.timm_kwargs.depth"),
        ("train.progress_bar=sometimes", "train.progress_bar"),
        ("train.precision=fp8", "train.precision"),
        ("model.norm_last_layer=maybe", "model.norm_last_layer"),
        ("dino.center_momentum=1.0", "dino.center_momentum"),
        ("optim", "optim"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, DATA + [override])
    assert key in str(info.value)


def test_missing_data_path_is_named():
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, [])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, DATA)
    assert "optim.learning_rate" in str(info.value) and str(recipe) in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", DATA)


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(REPO / "configs" / "paper_vit_small16.yaml", DATA)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg
    assert to_dict(cfg)["data"]["global_crops_scale"] == [0.25, 1.0]


def test_scaled_lr():
    assert scaled_lr(0.0005, 64, 8) == pytest.approx(0.001)
    assert scaled_lr(0.0005, 64, 16) == pytest.approx(0.002)


def test_fused_attention_values_from_the_command_line():
    assert load_config(None, DATA + ["train.fused_attention=explicit"]).train.fused_attention == "explicit"
    with pytest.raises(ConfigError, match="train.fused_attention"):
        load_config(None, DATA + ["train.fused_attention=on"])


def test_any_timm_model_name_is_an_arch():
    cfg = load_config(None, DATA + ["model.arch=resnet50", "model.timm_kwargs={drop_rate: 0.1}"])
    assert cfg.model.arch == "resnet50" and cfg.model.timm_kwargs == {"drop_rate": 0.1}
    # A timm model's patch size is its own: global/local sizes are not checked against model.patch_size.
    assert load_config(None, DATA + ["model.arch=convnext_atto", "data.global_crops_size=100"])


def test_non_finite_numbers_are_refused_by_name_everywhere():
    """Every float field of the schema refuses .inf and .nan, with the key in the message."""
    import dataclasses
    import typing

    from dino_train.config import Config

    cfg, floats = Config(), []
    for section in dataclasses.fields(cfg):
        hints = typing.get_type_hints(type(getattr(cfg, section.name)))
        floats += [f"{section.name}.{name}" for name, tp in hints.items() if tp is float]
    assert len(floats) >= 13  # the test would pass vacuously if the walk found none
    for key in floats:
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError, match="finite"):
                load_config(None, DATA + [f"{key}={bad}"])


@pytest.mark.parametrize("path", ["runs/demo: BN head", "runs/exp #3", "2024", "runs/[a]", "yes"])
def test_string_settings_take_the_text_as_typed(path):
    """YAML would read these as a mapping, a comment, a number, a list or a boolean."""
    cfg = load_config(None, [f"data.path={path}", f"train.output_dir={path}"])
    assert cfg.data.path == path and cfg.train.output_dir == path


def test_quoted_strings_and_other_types_still_read_as_yaml():
    cfg = load_config(None, ["data.path='a b'", "optim.lr=1e-3", "data.global_crops_scale=[0.3, 1]"])
    assert cfg.data.path == "a b" and cfg.optim.lr == 0.001 and cfg.data.global_crops_scale == (0.3, 1.0)
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["data.path=x", "optim.lr=runs/a: b"])


def test_an_override_sets_one_entry_of_a_mapping_setting():
    """``model.timm_kwargs.num_heads=6`` on the long demo's recipe (``timm_kwargs: {depth: 6}``) keeps the
    depth and passes 6 as a number (it once reached timm as the override's wrapper and failed there)."""
    cfg = load_config(REPO / "configs" / "demo_long.yaml", DATA + ["model.timm_kwargs.num_heads=6"])
    assert cfg.model.timm_kwargs == {"depth": 6, "num_heads": 6}
    cfg = load_config(REPO / "configs" / "demo_long.yaml", DATA + ["model.timm_kwargs={num_heads: 6}"])
    assert cfg.model.timm_kwargs == {"num_heads": 6}
    with pytest.raises(ConfigError, match="model.timm_kwargs.depth"):
        load_config(None, DATA + ["model.timm_kwargs.depth=.inf"])


def test_a_file_that_is_not_yaml_is_named_once(tmp_path):
    bad = tmp_path / "recipe.py"
    bad.write_text("a: b: c\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, DATA)
    assert str(err.value).startswith(f"{bad}: not valid YAML") and str(err.value).count(str(bad)) == 1
