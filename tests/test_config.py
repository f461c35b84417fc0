import pytest
import yaml

from mmadapt.config import ConfigError, load_config, reference
from tests.helpers import REPO

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
PRESETS = sorted((REPO / "models").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_and_opens_with_its_command(recipe):
    load_config(recipe)
    assert recipe.read_text().startswith("#")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates_with_the_recipe_of_its_modalities(preset):
    text = preset.read_text()
    recipes = [name for name, key in (("xcomposer", "\nvision:"), ("blsp_kd", "\nspeech:")) if key in text]
    assert recipes and text.startswith("#")
    for recipe in recipes:
        cfg = load_config(REPO / "configs" / f"{recipe}.yaml", [f"model={preset.relative_to(REPO)}"])
        assert cfg.preset == str(preset.relative_to(REPO))


def test_blsp_kd_needs_a_speech_encoder():
    with pytest.raises(ConfigError, match="blsp_kd needs a model with a speech encoder"):
        load_config(REPO / "configs" / "blsp_kd.yaml", ["model=models/smollm2-vision.yaml", "train.trainable=[adapters]"])


def test_overrides_parse_values_as_yaml():
    cfg = load_config(
        REPO / "configs" / "xcomposer.yaml",
        ["model=models/tiny.yaml", "train.max_steps=8", "train.align_steps=0", "deepspeed.zero_stage=3", "adapters.0.r=4",
         "train.trainable=[adapters]", "data.eval=null"],
    )
    assert (cfg.train.max_steps, cfg.deepspeed.zero_stage, cfg.adapters[0]["r"]) == (8, 3, 4)
    assert cfg.train.trainable == ["adapters"] and cfg.data.eval is None


def test_adapters_list_replaces_the_presets_whole():
    cfg = load_config(
        REPO / "configs" / "xcomposer.yaml",
        ["model=models/tiny.yaml", "adapters=[{type: plora, targets: [q_proj], r: 2}]"],
    )
    assert cfg.adapters == [{"type": "plora", "targets": ["q_proj"], "r": 2}]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=8", "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
        ("train.max_steps=eight", "config key 'train.max_steps'"),
        ("deepspeed.zero_stage=4", "config key 'deepspeed.zero_stage'"),
        ("train.trainable=[adapters, brain]", "config key 'train.trainable.1'"),
        ("adapters.0.rank=4", "unknown config key 'adapters.0.rank' (did you mean 'adapters.0.r'?)"),
        ("adapters.0.type=flora", "flora_opt"),
        ("model=models/none.yaml", "model preset 'models/none.yaml'"),
        ("train.max_steps", "must look like dotted.key=value"),
        ("train.max_steps=600", "config key 'train.align_steps': 600 leaves no LM step"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs" / "xcomposer.yaml", ["model=models/tiny.yaml", override])
    assert message in str(error.value)
    assert "\n" not in str(error.value).strip()


def test_saved_config_round_trips(tmp_path):
    from mmadapt.config import save_config

    cfg = load_config(REPO / "configs" / "xcomposer.yaml", ["model=models/tiny.yaml"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["llm"]["source"] == "random"


def test_reference_lists_every_contract_key():
    text = reference()
    for key in ["data.train", "data.on_bad_record", "data.max_audio_seconds", "train.resume", "train.precision",
                "train.keep_last", "deepspeed.zero_stage", "deepspeed.offload_optimizer"]:
        assert f"\n{key} = " in "\n" + text
