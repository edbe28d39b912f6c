"""Vision-language SFT on the text path: a tiny InternVL (native transformers format) trains on image conversations.

Packed rows of image conversations give the log-probs each conversation gets alone through the model's own forward
with its own tiles; `align sft` trains on image rows, exports, and the export loads back by path as an
image-text-to-text model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from align.config import DataConfig, ImagesConfig, LoraConfig, ModelConfig, OptimConfig, SourceConfig
from align.engine.models import load_causal_lm, load_tokenizer
from align.engine.vision import has_vision, prepare_images
from align.losses.logprobs import target_logprobs
from data_builders.bad_rows import BadRowPolicy
from data_builders.packing import collate_rows
from data_builders.sft_data import build_samples
from tests.conftest import ALIGN, ROOT

TINY = "builtin:internvl-tiny"


def image_rows(tmp_path, n: int = 2) -> str:
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (200, 200, 10)]
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        Image.new("RGB", (112 if i % 2 == 0 else 56, 56), colours[i % 4]).save(tmp_path / name)
        rows.append({"conversations": [{"from": "human", "value": f"<image>\nWhat colour is picture {i}?"},
                                       {"from": "gpt", "value": ["Red.", "Green.", "Blue.", "Yellow."][i % 4]}], "images": [name]})  # fmt: skip
    path = tmp_path / "images.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def tiny_vlm():
    """The built-in tiny InternVL in eval mode, its tokenizer with the image tokens, and the `ImageText` it renders with."""
    cfg = ModelConfig(name_or_path=TINY, attn_implementation="sdpa")
    tok = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tok, torch.float32).eval()
    return model, tok, prepare_images(model, tok, ImagesConfig(max_tiles=4))


def plain_logprobs(model, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """(len(ids) − 1,) log p(ids[t] | ids[:t]) from the model's own forward of this sequence alone, with its own tiles."""
    logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float().log_softmax(-1)
    return logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@torch.no_grad()
def test_packed_image_conversations_equal_separate_forwards(tmp_path):
    model, tok, images = tiny_vlm()
    assert has_vision(model)
    assert images.config.tile_size == 56 and images.config.tokens_per_tile == 4  # read from the model's vision side
    data = DataConfig(train=[SourceConfig(path=image_rows(tmp_path, 3))], max_length=256)
    samples, _ = build_samples(data.train, data, tok, BadRowPolicy("error"), "train", images=images)
    assert [s.tiles for s in samples] == [[3], [1], [3]]  # 2:1 → 2 tiles + thumbnail; 1:1 → 1 tile
    batch = collate_rows([samples], tok.pad_token_id)  # one packed row, three documents, seven tiles
    logprobs, _ = target_logprobs(model, batch)
    expected = [plain_logprobs(model, s.input_ids, s.pixels())[torch.tensor(s.loss_mask[1:]).bool()] for s in samples]
    torch.testing.assert_close(logprobs, torch.cat(expected), rtol=0, atol=1e-5)
    # the tiles matter: other pictures give other log-probs
    batch.pixel_values = batch.pixel_values.flip(0)
    assert not torch.allclose(target_logprobs(model, batch)[0], logprobs, atol=1e-4)


def test_align_sft_trains_a_tiny_internvl_and_the_export_loads_by_path(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from align.cli import main

    data = image_rows(tmp_path, 8)
    out = tmp_path / "sft"
    args = ["sft", "--config", str(ROOT / "configs" / "sft" / "quickstart.yaml"), "--set", f"model.name_or_path={TINY}",
            "--set", f"output_dir={out}", "--set", f"data.train=[{{path: {data}}}]", "--set", "data.max_length=128",
            "--set", "data.images.max_tiles=4", "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
            "--set", "train.max_steps=3", "--set", "eval.enabled=false", "--set", "logging.wandb=false",
            "--set", "logging.progress=false", "--set", "optim.warmup_steps=0"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["train"]["rows"] == 8
    exported = AutoModelForImageTextToText.from_pretrained(out / "model")  # a local path, as a hub name would load
    assert type(exported).__name__ == "InternVLForConditionalGeneration"
    reloaded = load_causal_lm(ModelConfig(name_or_path=str(out / "model")), load_tokenizer(ModelConfig(name_or_path=str(out / "model"))), torch.float32)
    assert has_vision(reloaded) and reloaded.config.image_token_id == exported.config.image_token_id


def preference_rows(tmp_path, n: int = 3) -> str:
    rows = []
    for i in range(n):
        name = f"pref{i}.png"
        Image.new("RGB", (112 if i % 2 else 56, 56), (40 * i, 200 - 40 * i, 90)).save(tmp_path / name)
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": f"Describe picture {i}."}]}],
                     "chosen": f"A green picture, number {i}.", "rejected": "I cannot see anything.", "condition": "math"})  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@torch.no_grad()
def test_image_preference_pairs_share_the_prompt_image_and_equal_separate_forwards(tmp_path):
    from align.trainers.mpo import collate_preference, sequence_logprobs
    from data_builders.preference_data import build_preference_pairs

    model, tok, images = tiny_vlm()
    data = DataConfig(train=[SourceConfig(path=preference_rows(tmp_path))], max_length=256)
    pairs = build_preference_pairs(data.train, data, tok, BadRowPolicy("error"), "train", images=images)
    assert [len(p.images) for p in pairs] == [1, 1, 1]
    for share in (True, False):
        batch = collate_preference([pairs], list(range(len(pairs))), tok.pad_token_id, share)
        per_pair = [image.tiles for p in pairs for image in p.images]
        assert batch.rows.pixel_values.shape[0] == sum(per_pair) * (1 if share else 2)  # the image once per shared prompt
        sums = sequence_logprobs(model, batch)
        for k, pair in enumerate(pairs):
            pixels = pair.images[0].pixels()
            for side, ids in enumerate((pair.chosen, pair.rejected)):
                expected = plain_logprobs(model, ids, pixels)[pair.prompt_length - 1 :].sum()  # the response's tokens
                torch.testing.assert_close(sums[k, side], expected, rtol=0, atol=1e-4)


def test_align_mpo_trains_a_tiny_internvl_on_image_pairs(tmp_path):
    from align.cli import main

    data = preference_rows(tmp_path, 4)
    out = tmp_path / "mpo"
    args = ["mpo", "--config", str(ROOT / "configs" / "mpo" / "quickstart.yaml"), "--set", f"model.name_or_path={TINY}",
            "--set", f"output_dir={out}", "--set", f"data.train=[{{path: {data}}}]", "--set", "data.eval=[]",
            "--set", "data.images.max_tiles=4", "--set", "mpo.sampled_pairs.enabled=false", "--set", "mpo.reference=model",
            "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2", "--set", "train.max_steps=2",
            "--set", "eval.enabled=false", "--set", "logging.wandb=false", "--set", "logging.progress=false", "--set", "train.log_every=1"]  # fmt: skip
    assert main(args) == 0
    first, second = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:2]
    # step 1: the policy is its reference (same images, same tokens), so DPO's loss is log 2 and BCO's 2·log 2
    assert abs(first["loss/sigmoid"] - math.log(2)) < 1e-5 and abs(first["loss/bco_pair"] - 2 * math.log(2)) < 1e-5
    assert second["rewards/margin"] != 0.0  # the first step moved the policy on these image pairs
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_zero3_ranks_with_and_without_images_both_run_the_vision_tower(tmp_path):
    """ZeRO-3 gathers the vision tower's weights inside its forward: a rank whose batch has no image must still run it
    (on an idle tile, weight 0), or the rank that has one waits for it forever (transformers #37186)."""
    import subprocess
    import sys

    from tests.conftest import run_env

    rows = [json.loads(line) for line in Path(image_rows(tmp_path, 1)).read_text().splitlines()]
    rows.append({"messages": [{"role": "user", "content": "No picture here."}, {"role": "assistant", "content": "Then I see nothing."}]})
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "zero3"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--config_file",
                str(ROOT / "configs" / "accelerate" / "zero3.yaml"), "--main_process_port", "0", "-m", "align"]  # fmt: skip
    args = ["sft", "--config", str(ROOT / "configs" / "sft" / "quickstart.yaml"), "--set", f"model.name_or_path={TINY}",
            "--set", f"output_dir={out}", "--set", f"data.train=[{{path: {data}}}]", "--set", "data.packing=false",
            "--set", "data.max_length=128", "--set", "data.images.max_tiles=4", "--set", "train.micro_batch_size=1",
            "--set", "train.global_batch_size=2", "--set", "train.max_steps=2", "--set", "eval.enabled=false",
            "--set", "logging.wandb=false", "--set", "logging.progress=false", "--set", "train.log_every=1"]  # fmt: skip
    proc = subprocess.run(launcher + args, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-30000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["deepspeed"] is True and summary["steps"] == 2
    # and the same steps in one process (both rows in one micro-batch step): the idle tile changes no loss
    one = tmp_path / "one"
    single = [a.replace(str(out), str(one)) for a in args] + ["--set", "train.log_every=1"]
    assert subprocess.run(ALIGN + single, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=150).returncode == 0
    two = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    ones = [json.loads(line)["loss"] for line in (one / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert len(two) == len(ones) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(ones), rtol=1e-5, atol=1e-5)


def test_freeze_keeps_the_named_parts_as_loaded_and_lora_adapts_the_language_model_only(tmp_path):
    from align.engine.optim import build_optimizer
    from data_builders.errors import UserError

    def trainable(model) -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    cfg = ModelConfig(name_or_path=TINY)
    tok = load_tokenizer(cfg)
    everything = trainable(load_causal_lm(cfg, tok, torch.float32))
    frozen = load_causal_lm(ModelConfig(name_or_path=TINY, freeze=["vision", "projector"]), tok, torch.float32)
    kept = trainable(frozen)
    assert kept and all(".vision_tower." not in n and ".multi_modal_projector." not in n for n in kept)
    assert kept == {n for n in everything if ".language_model." in n or n.startswith("lm_head")}
    assert {id(p) for g in build_optimizer(frozen, OptimConfig()).param_groups for p in g["params"]} == {
        id(p) for p in frozen.parameters() if p.requires_grad}  # no optimizer state for frozen parts  # fmt: skip
    language_frozen = trainable(load_causal_lm(ModelConfig(name_or_path=TINY, freeze=["language"]), tok, torch.float32))
    assert language_frozen and all(".vision_tower." in n or ".multi_modal_projector." in n for n in language_frozen)
    with pytest.raises(UserError, match="names parts of a vision-language model"):
        load_causal_lm(ModelConfig(name_or_path="builtin:tiny", freeze=["vision"]), tok, torch.float32)
    lora = load_causal_lm(ModelConfig(name_or_path=TINY, lora=LoraConfig(enabled=True)), tok, torch.float32)
    adapters = [n for n in trainable(lora) if "lora_" in n]
    assert adapters and all(".language_model." in n for n in adapters)  # the vision tower's q/k/v keep their weights


def test_an_image_text_model_of_another_family_is_refused_not_tiled_as_internvl():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from data_builders.errors import UserError

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                        image_size=28, patch_size=14),
                         text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                                 vocab_size=600))  # fmt: skip
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny"))
    with pytest.raises(UserError, match=r"LlavaForConditionalGeneration \(llava\): align's image path implements InternVL's tiling"):
        prepare_images(LlavaForConditionalGeneration(config), tok, ImagesConfig())


def test_a_packed_image_row_trains_the_loss_of_its_documents_unpacked(tmp_path):
    """The SFT loss (token mean over the step) and its gradient from one packed row of image conversations equal those
    of the same conversations each in its own row, within 1e-6 in fp32."""
    from align.trainers.sft import weighted_nll

    model, tok, images = tiny_vlm()
    data = DataConfig(train=[SourceConfig(path=image_rows(tmp_path, 4))], max_length=256)
    samples, _ = build_samples(data.train, data, tok, BadRowPolicy("error"), "train", images=images)
    total = float(sum(s.num_targets for s in samples))

    def loss_and_grad(batch):
        model.zero_grad()
        logprobs, mask = target_logprobs(model, batch)
        loss = weighted_nll(logprobs, batch.weights[mask], total)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    packed, packed_grad = loss_and_grad(collate_rows([samples], tok.pad_token_id))
    separate, separate_grad = loss_and_grad(collate_rows([[s] for s in samples], tok.pad_token_id))
    assert abs(float(packed) - float(separate)) < 1e-6 and float(packed) > 1.0
    torch.testing.assert_close(packed_grad, separate_grad, rtol=0, atol=1e-6)
