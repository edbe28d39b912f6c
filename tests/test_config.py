from pathlib import Path

import pytest

from align.config import ConfigError, SFTRecipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_path_and_closest(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'.*did you mean 'optim.lr'"):
        load_recipe(SFTRecipe, path)


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'ouput_dir'.*'output_dir'"):
        load_recipe(SFTRecipe, write(tmp_path, "ouput_dir: x\n"))


def test_wrong_type_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: expected int, got str"):
        load_recipe(SFTRecipe, write(tmp_path, "train:\n  micro_batch_size: eight\n"))


def test_bad_literal_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"data.loss_reduction: 'tokn' is not one of .*did you mean 'token'"):
        load_recipe(SFTRecipe, write(tmp_path, "data:\n  loss_reduction: tokn\n"))


def test_dotted_overrides_apply_and_parse(tmp_path):
    recipe = load_recipe(
        SFTRecipe,
        write(tmp_path, "output_dir: a\noptim:\n  lr: 0.1\n"),
        ["optim.lr=1e-5", "data.max_length=512", "output_dir=/tmp/x", "logging.tags=[a, b]"],
    )
    assert recipe.optim.lr == pytest.approx(1e-5)
    assert recipe.data.max_length == 512
    assert recipe.output_dir == "/tmp/x"
    assert recipe.logging.tags == ["a", "b"]


def test_override_of_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data.max_lenght'.*'data.max_length'"):
        load_recipe(SFTRecipe, write(tmp_path, "output_dir: a\n"), ["data.max_lenght=3"])


def test_nested_list_of_sections_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data.train\[0\].pth'"):
        load_recipe(SFTRecipe, write(tmp_path, "data:\n  train: [{pth: x}]\n"))


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "sft").glob("*.yaml")) + sorted((ROOT / "configs" / "recipes").glob("*sft*.yaml")))
def test_shipped_sft_recipes_validate(recipe):
    loaded = load_recipe(SFTRecipe, recipe)
    assert loaded.output_dir


def test_internvl_recipe_matches_paper():
    r = load_recipe(SFTRecipe, ROOT / "configs" / "recipes" / "internvl_chat_v1_5_sft.yaml")
    assert r.engine.deepspeed.endswith("zero3.json")
    assert r.model.attn_implementation == "auto"  # flash-attention 2 when present, else sdpa
    assert (r.optim.weight_decay, r.optim.lr, r.optim.warmup_steps, r.optim.schedule) == (0.1, 1e-5, 500, "cosine")
    assert (r.train.global_batch_size, r.data.max_length) == (1024, 8192)
