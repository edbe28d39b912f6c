"""Reward models on a vision-language model: the tiny InternVL with a scalar `score` head scores image comparisons.

Shared-prefix pair rows (the prompt's tiles once per pair) give the scores each sequence gets alone through the VLM and
its head with its own tiles; `align rm` trains on image pairs and its export reloads with the same head and scores; the
router scores an image prompt exactly as the trainer scored the same prompt and response.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import InternVLConfig, InternVLForConditionalGeneration

from align.config import DataConfig, ImagesConfig, ModelConfig, SourceConfig
from align.engine.models import freeze_lm_head, load_reward_model, load_tokenizer, with_score_head
from align.engine.vision import prepare_images
from align.reward_model_info import RewardModelInfo
from align.trainers.rm import collate_pairs
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.errors import UserError
from rewards.conditions import DEFAULT_CONDITIONS
from rewards.data import build_pairs
from rewards.model import pair_scores, reward_head, sequence_scores
from rewards.router import RewardRouter
from tests.conftest import ROOT
from tests.test_vlm import TINY, preference_rows

RM_QUICKSTART = str(ROOT / "configs" / "rm" / "quickstart.yaml")
TEXT_ROWS = [{"prompt": "What is 2 + 2?", "chosen": "Final Answer: 4", "rejected": "Final Answer: 5", "condition": "math"},
             {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": "Hi.", "rejected": "No.", "condition": "helpful"}]  # fmt: skip


def tiny_vlm_rm(model_path: str = TINY, seeded_head: bool = True):
    """The tiny InternVL reward model in eval mode (a seeded head: a new one is zero and scores everything 0), its
    tokenizer and the `ImageText` it renders with."""
    cfg = ModelConfig(name_or_path=model_path, attn_implementation="sdpa")
    tok = load_tokenizer(cfg)
    model = load_reward_model(cfg, tok).eval()
    if seeded_head:
        with torch.no_grad():
            reward_head(model).weight.normal_(generator=torch.Generator().manual_seed(0))
    return model, tok, prepare_images(model, tok, ImagesConfig(max_tiles=4))


def mixed_rows(tmp_path: Path) -> str:
    """Image pairs (OpenAI image parts; one with an `<image>` marker and a row-level `images` list) and text pairs."""
    rows = [json.loads(line) for line in Path(preference_rows(tmp_path, 3)).read_text().splitlines()]
    rows.insert(1, {"prompt": "<image>\nWhich colour dominates?", "images": ["pref1.png"], "chosen": "Green, mostly.",
                    "rejected": "There is no picture.", "condition": "helpful"})  # fmt: skip
    rows.insert(3, TEXT_ROWS[0])
    rows.append(TEXT_ROWS[1])
    path = tmp_path / "mixed_pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def data_for(path: str) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=path)], max_length=256)


def plain_scores(model, pair) -> torch.Tensor:
    """(2,) scores of chosen and rejected, each from the model's own forward of that sequence alone, with its own tiles."""
    pixels = torch.cat([ref.pixels() for ref in pair.images]) if pair.images else None
    return torch.cat([sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels)
                      for ids in (pair.chosen, pair.rejected)])  # fmt: skip


@torch.no_grad()
def test_shared_prefix_image_pairs_score_as_separate_forwards(tmp_path):
    model, tok, images = tiny_vlm_rm()
    data = data_for(mixed_rows(tmp_path))
    pairs = build_pairs(data.train, data, DEFAULT_CONDITIONS, tok, BadRowPolicy("error"), images=images)
    assert [len(p.images) for p in pairs] == [1, 1, 1, 0, 1, 0]
    expected = torch.stack([plain_scores(model, p) for p in pairs])
    assert float(expected.std()) > 0.01  # a seeded head: the scores differ, so equal scores below mean something
    rows = [pairs[:3], pairs[3:]]  # two rows: tiles are concatenated in the order of their tokens across rows
    tiles = sum(ref.tiles for p in pairs for ref in p.images)
    for share in (True, False):
        batch = collate_pairs(rows, tok.pad_token_id, share)
        assert batch.rows.pixel_values.shape[0] == tiles * (1 if share else 2)  # the image once per shared prompt
        chosen, rejected = pair_scores(model, batch.rows)
        torch.testing.assert_close(torch.stack([chosen, rejected], 1), expected, rtol=0, atol=1e-5)
    # the tiles matter: moved to other pairs, they change image pairs' scores; the text pairs keep theirs
    batch = collate_pairs(rows, tok.pad_token_id, True)
    batch.rows.pixel_values = batch.rows.pixel_values.flip(0)
    flipped = torch.stack(pair_scores(model, batch.rows), 1)
    assert (flipped - expected)[[0, 1, 2, 4]].abs().max() > 1e-4
    torch.testing.assert_close(flipped[[3, 5]], expected[[3, 5]], rtol=0, atol=1e-5)
    assert collate_pairs([[pairs[3], pairs[5]]], tok.pad_token_id).rows.pixel_values is None  # text pairs: the text path


def test_a_text_reward_model_given_image_rows_names_the_row(tmp_path):
    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    data = data_for(preference_rows(tmp_path, 1))
    with pytest.raises(BadRowError, match=r"row 1.*images.*1 image\(s\) but the reward model takes no images"):
        build_pairs(data.train, data, DEFAULT_CONDITIONS, tok, BadRowPolicy("error"))
    policy = BadRowPolicy("skip")
    data = data_for(mixed_rows(tmp_path))
    assert len(build_pairs(data.train, data, DEFAULT_CONDITIONS, tok, policy)) == 2 and policy.count == 4


def test_the_head_is_a_parameter_and_an_untied_lm_head_is_frozen():
    model, _, _ = tiny_vlm_rm(seeded_head=False)
    params = dict(model.named_parameters())
    assert params["score.weight"].requires_grad and float(params["score.weight"].detach().abs().sum()) == 0  # zero-initialised
    assert params["score.weight"] is reward_head(model).weight  # what accelerate / DeepSpeed partition and the loss reads
    config = model.config.to_dict() | {"tie_word_embeddings": False}
    untied = with_score_head(InternVLForConditionalGeneration)(InternVLConfig.from_dict(config))
    freeze_lm_head(untied)
    assert not untied.lm_head.weight.requires_grad and untied.get_input_embeddings().weight.requires_grad
    freeze_lm_head(model)  # tied (the built-in): the embeddings train, so the head does too
    assert model.lm_head.weight.requires_grad


def rm_args(out: Path, model: str, data: str, *extra: str) -> list[str]:
    return ["rm", "--config", RM_QUICKSTART, "--set", f"model.name_or_path={model}", "--set", f"output_dir={out}",
            "--set", f"data.train=[{{path: {data}}}]", "--set", f"data.eval=[{{path: {data}}}]", "--set", "data.images.max_tiles=4",
            "--set", "data.pair_row_tokens=160", "--set", "train.micro_batch_size=1", "--set", "train.global_batch_size=2",
            "--set", "train.max_steps=3", "--set", "train.log_every=1", "--set", "optim.lr=1e-2", "--set", "optim.warmup_steps=0",
            "--set", "logging.wandb=false", "--set", "logging.progress=false", *extra]  # fmt: skip


def check_export(out: Path, data: str) -> dict:
    """The run's summary, after checking that its export loads back as the reward model it was: the trained head (not a
    new zero one), the image settings it was trained with, and the per-condition scores its stats were measured with."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["train_pairs"] == 6 and summary["metrics"]["eval_pairs"] == 6
    info = RewardModelInfo.read(out / "model")
    assert info.images["max_tiles"] == 4 and info.stats == summary["metrics"]["reward_stats"]
    model, tok, _ = tiny_vlm_rm(str(out / "model"), seeded_head=False)
    assert float(reward_head(model).weight.detach().abs().sum()) > 0
    images = prepare_images(model, tok, info.images_config(ImagesConfig()))
    pairs = build_pairs(data_for(data).train, data_for(data), DEFAULT_CONDITIONS, tok, BadRowPolicy("error"), images=images)
    with torch.no_grad():
        scores = torch.stack(pair_scores(model, collate_pairs([pairs], tok.pad_token_id).rows), 1)
    assert set(info.stats) == {"math", "helpful"} and float(scores.std()) > 1e-3  # the trained head tells sequences apart
    for condition, stat in info.stats.items():
        mine = scores[[i for i, p in enumerate(pairs) if p.condition == condition]].flatten()
        assert abs(float(mine.mean()) - stat["mean"]) < 1e-5 and abs(float(mine.std(correction=0)) - stat["std"]) < 1e-5
    return summary


def test_align_rm_trains_on_image_pairs_and_the_export_reloads_with_its_scores(tmp_path):
    from align.cli import main

    data, out = mixed_rows(tmp_path), tmp_path / "rm"
    assert main(rm_args(out, TINY, data)) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["score_mean"] == 0.0  # a new head starts at zero
    check_export(out, data)


def test_zero3_ranks_train_the_head_of_a_vlm_reward_model_started_from_an_sft_export(tmp_path):
    """Two ZeRO-3 ranks (accelerate + DeepSpeed), a pair per row (so some batches have no image): the head is a
    partitioned parameter of the prepared model, trained, gathered into the export; the SFT model's weights start it."""
    import subprocess
    import sys

    from align.engine.models import load_causal_lm
    from tests.conftest import run_env

    sft = tmp_path / "sft"
    cfg = ModelConfig(name_or_path=TINY)
    tok = load_tokenizer(cfg)
    load_causal_lm(cfg, tok, torch.float32, seed=3).save_pretrained(sft)
    tok.save_pretrained(sft)
    model, _, _ = tiny_vlm_rm(str(sft), seeded_head=False)  # an SFT export has no head: a zero one, the backbone as saved
    assert float(reward_head(model).weight.detach().abs().sum()) == 0
    data, out = mixed_rows(tmp_path), tmp_path / "zero3"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                str(ROOT / "configs" / "accelerate" / "zero3.yaml"), "--main_process_port", "0", "-m", "align"]  # fmt: skip
    proc = subprocess.run(launcher + rm_args(out, str(sft), data, "--set", "data.packing=false"), cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-30000:]
    summary = check_export(out, data)
    assert summary["world_size"] == 2 and summary["deepspeed"] is True
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["score_mean"] == 0.0 and first["grad_norm"] > 0


def test_lora_on_a_vlm_reward_model_adapts_the_language_model_and_exports_its_scores(tmp_path):
    from align.config import RMRecipe, load_recipe
    from align.engine.checkpoint import export_model
    from align.engine.core import Engine
    from align.engine.loop import fit
    from align.trainers.rm import RMTrainer

    data = mixed_rows(tmp_path)
    overrides = [f"model.name_or_path={TINY}", f"output_dir={tmp_path / 'rm'}", f"data.train=[{{path: {data}}}]", f"data.eval=[{{path: {data}}}]",
                 "data.images.max_tiles=4", "model.lora.enabled=true", "model.lora.r=4", "train.micro_batch_size=2", "train.global_batch_size=2",
                 "train.max_steps=2", "optim.lr=1e-2", "optim.warmup_steps=0", "logging.wandb=false", "logging.progress=false"]  # fmt: skip
    recipe = load_recipe(RMRecipe, RM_QUICKSTART, overrides)
    trainer = RMTrainer(recipe, Engine.create(recipe))
    trainer.setup()
    trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert any(".score." in n for n in trainable) and any("lora_" in n for n in trainable)
    assert all(".score." in n or ("lora_" in n and ".language_model." in n) for n in trainable), trainable[:5]  # no adapter on the vision tower
    result = fit(trainer.engine, trainer)
    result["logger"].close()
    out = export_model(trainer.engine.accelerator, trainer.model, trainer.tokenizer, tmp_path / "rm" / "model")
    reloaded = load_reward_model(ModelConfig(name_or_path=str(out), attn_implementation="sdpa"), load_tokenizer(ModelConfig(name_or_path=str(out))))
    assert not any("lora" in k for k in reloaded.state_dict())
    batch = trainer.collate([0], "eval")
    trainer.model.eval()
    with torch.no_grad():
        trained, merged = torch.stack(pair_scores(trainer.model, batch.rows)), torch.stack(pair_scores(reloaded.eval(), batch.rows))
    assert batch.rows.pixel_values is not None and float(trained.abs().max()) > 0  # image pairs, and the zero head was trained
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)


def data_uri(colour: tuple[int, int, int], size: tuple[int, int] = (112, 56)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@torch.no_grad()
def test_the_router_scores_an_image_prompt_as_the_trainer_does(tmp_path):
    model, tok, images = tiny_vlm_rm()

    def image_prompt(uri: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": uri}, {"type": "text", "text": "What colour is it?"}]}]

    samples = [{"condition": "math", "prompt": [{"role": "user", "content": "What is 2 + 2?"}], "response": "Final Answer: 4"},
               {"condition": "helpful", "prompt": image_prompt(data_uri((200, 30, 30))), "response": "It is red."},
               {"condition": "helpful", "prompt": image_prompt(data_uri((30, 30, 200), (56, 56))), "response": "It is red."}]  # fmt: skip
    router = RewardRouter({"default": {"rm": 1.0}}, model, tok, DEFAULT_CONDITIONS, images=images, row_tokens=512)
    scores = router.score(samples).scores
    rows = [{"prompt": s["prompt"], "chosen": s["response"], "rejected": "I do not know.", "condition": s["condition"]} for s in samples]
    path = tmp_path / "same.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = build_pairs([SourceConfig(path=str(path))], data_for(str(path)), DEFAULT_CONDITIONS, tok, BadRowPolicy("error"), images=images)
    trainer_chosen = pair_scores(model, collate_pairs([pairs], tok.pad_token_id).rows)[0]
    torch.testing.assert_close(scores, trainer_chosen, rtol=0, atol=1e-5)
    assert abs(float(scores[1] - scores[2])) > 1e-4  # same text, other picture: another score
    text_router = RewardRouter({"default": {"rm": 1.0}}, model, tok, DEFAULT_CONDITIONS)
    assert torch.equal(text_router.score(samples[:1]).scores, router.score(samples[:1]).scores)  # text prompts: the text path
    with pytest.raises(UserError, match="sample 2 has 1 image"):
        text_router.score(samples)


def test_align_bon_ranks_samples_of_image_prompts_with_a_vlm_reward_model(tmp_path):
    """Best-of-N on image prompts: the VLM policy samples with each prompt's picture, the VLM reward model scores each
    sample with it (as the router does in training), and the picks are the argmax of those scores."""
    from align.bon import BestOfN, BoNRecipe
    from align.cli import main
    from align.config import load_recipe
    from data_builders.visual_task import VisualTask
    from tests.test_bon import QUICKSTART, bon_overrides, check_against_samples

    data, rm = mixed_rows(tmp_path), tmp_path / "rm"
    assert main(rm_args(rm, TINY, data)) == 0
    prompts = tmp_path / "prompts.jsonl"
    rows = [{**p, "condition": "math"} for p in VisualTask(0).rl_prompts(4, "heldout")]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "bon"
    overrides = bon_overrides(out, TINY, rm / "model", **{"eval.prompts_path": str(prompts), "eval.num_prompts": 4, "eval.max_new_tokens": 4,
                                                  "bon.n_values": "[1,2]", "data.images.max_tiles": 4})  # fmt: skip
    assert main(["bon", "--config", QUICKSTART, *[a for o in overrides for a in ("--set", o)]]) == 0
    _, saved = check_against_samples(out, [1, 2], 4)
    job = BestOfN(load_recipe(BoNRecipe, QUICKSTART, overrides))
    job.setup()  # the same policy and reward model, to score the saved samples again
    assert job.images is not None and job.router.images is not None
    scored = [{"condition": "math", "prompt": rows[p]["messages"], "response": r["response"]} for p, group in saved.items() for r in group]
    rescored = job.router.score(scored).scores.float()
    assert torch.allclose(rescored, torch.tensor([r["score"] for group in saved.values() for r in group]), atol=1e-5)
    blind = job.router.score([{**s, "prompt": [{"role": "user", "content": "Describe the picture."}]} for s in scored]).scores.float()
    assert not torch.allclose(blind, rescored, atol=1e-3)  # the picture is part of what the reward model scores
