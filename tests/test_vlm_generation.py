"""Generation with images and the synthetic visual task: what evaluation, MPO's sampled pairs and best-of-N sample from.

Batched, left-padded generation from image prompts equals each prompt generated alone by the model's own forward with
its own tiles; n samples per image prompt carry their prompt's tiles (a misaligned tile would change the sample);
Dropout-NTP continues without the image; the visual task's held-out pictures never appear in training and its answers
are checked by the same verifier as the arithmetic suite.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from align.evaluation import load_prompts
from align.rollout.generation import HFGenerator, SamplingParams
from data_builders.errors import UserError
from data_builders.pair_builders import drop_evidence
from data_builders.visual_task import CONDITIONS, VisualTask, response_for, wrong_answer
from rewards.verifiers import task_score
from tests.test_vlm import tiny_vlm


def scrambled_vlm():
    """The tiny InternVL with large random weights, so its greedy tokens depend on the image and on every position."""
    model, tok, images = tiny_vlm()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    return model, tok, images


@torch.no_grad()
def plain_greedy(model, ids: list[int], pixels: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Greedy tokens from full forwards without a cache, one prompt alone."""
    x, out = torch.tensor([ids]), []
    for _ in range(steps):
        token = int(model(input_ids=x, pixel_values=pixels, use_cache=False).logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        x = torch.cat([x, torch.tensor([[token]])], 1)
    return out


def test_batched_image_generation_equals_each_prompt_alone():
    model, tok, images = scrambled_vlm()
    generator = HFGenerator(model, tok, Accelerator(cpu=True), batch_size=4, images=images)
    problems = VisualTask(0).rl_prompts(5)  # wide (3 tiles) and square (1 tile) pictures, prompts of different lengths
    out = generator.generate([p["messages"] for p in problems], SamplingParams(max_new_tokens=6))
    tiles = []
    for k, (problem, (generation,)) in enumerate(zip(problems, out, strict=True)):
        ids, pixels = generator.render(problem["messages"], k)
        tiles.append(pixels.shape[0])
        assert generation.prompt_ids == ids and ids.count(images.ids.context) == 4 * pixels.shape[0]
        assert generation.response_ids == plain_greedy(model, ids, pixels, 6, tok.eos_token_id)
    assert sorted(set(tiles)) == [1, 3]
    # the image decides: the same question about another picture gives other tokens
    other = generator.generate([VisualTask(1).rl_prompts(4)[3]["messages"]], SamplingParams(max_new_tokens=6))
    assert other[0][0].response_ids != out[3][0].response_ids


def test_n_samples_of_an_image_prompt_keep_its_tiles():
    """Near-zero temperature: every one of n samples must be the greedy answer, which holds only if each copy got its own tiles."""
    model, tok, images = scrambled_vlm()
    generator = HFGenerator(model, tok, Accelerator(cpu=True), batch_size=8, images=images)
    prompts = [p["messages"] for p in VisualTask(0).rl_prompts(3)]
    greedy = generator.generate(prompts, SamplingParams(max_new_tokens=5))
    sampled = generator.generate(prompts, SamplingParams(max_new_tokens=5, n=3, temperature=1e-4))
    assert [[g.response_ids for g in group] for group in sampled] == [[g[0].response_ids] * 3 for g in greedy]


def test_dropout_ntp_continues_without_the_image():
    model, tok, images = scrambled_vlm()
    generator = HFGenerator(model, tok, Accelerator(cpu=True), images=images)
    messages = VisualTask(0).rl_prompts(1)[0]["messages"]
    blind = drop_evidence(messages)
    ids, pixels = generator.render(blind, 0)
    assert pixels is None and images.ids.context not in ids
    (with_prefix,), = generator.generate([blind], SamplingParams(max_new_tokens=4), prefixes=["I see"])
    assert with_prefix.prompt_ids[: len(ids)] == ids and len(with_prefix.prompt_ids) > len(ids)


def test_image_prompts_for_a_text_model_are_one_clear_error():
    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny")
    tok = load_tokenizer(cfg)
    generator = HFGenerator(load_causal_lm(cfg, tok, torch.float32), tok, Accelerator(cpu=True))
    with pytest.raises(UserError, match="prompt 1 has 1 image.*takes no images"):
        generator.generate([VisualTask(0).rl_prompts(1)[0]["messages"]], SamplingParams(max_new_tokens=2))


def test_prompt_files_make_their_images_self_contained(tmp_path):
    """ShareGPT-style markers + a relative `images` list become parts with absolute paths (the prompt leaves its file)."""
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "pics" / "a.png")
    rows = [{"messages": [{"role": "user", "content": "<image>\nWhat colour is the shape?"}], "images": ["pics/a.png"], "answer": "red"},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "pics/a.png"}, {"type": "text", "text": "Colour?"}]}],
             "answer": "red"},
            {"messages": [{"role": "user", "content": "What is 2+2?"}], "answer": 4}]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    problems = load_prompts(str(path), None, 10)
    absolute = str(tmp_path / "pics" / "a.png")
    assert problems[0]["messages"][0]["content"] == [{"type": "image", "image": absolute}, {"type": "text", "text": "\nWhat colour is the shape?"}]
    assert "images" not in problems[0]
    assert problems[1]["messages"][0]["content"][0] == {"type": "image", "image": absolute}
    assert problems[2]["messages"] == rows[2]["messages"]  # text prompts untouched
    _, tok, images = tiny_vlm()
    generator = HFGenerator(None, tok, Accelerator(cpu=True), images=images)
    assert generator.render(problems[0]["messages"], 0)[1].shape == (1, 3, 56, 56)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "<image><image> two?"}], "images": ["pics/a.png"]}))
    with pytest.raises(UserError, match=r"bad\.jsonl.*row 1.*more <image> markers than images"):
        load_prompts(str(bad), None, 10)


def test_visual_task_heldout_pictures_are_never_trained_on_and_answers_verify():
    task = VisualTask(0)
    train = task.problems(3000, "train")
    heldout = task.problems(300, "heldout")
    assert not {p.picture.key for p in train} & {p.picture.key for p in heldout}
    assert [p.condition for p in heldout[:6]] == [*CONDITIONS, *CONDITIONS]
    assert {len(p.picture.boxes) for p in train if p.condition == "count"} == {1, 2, 3}
    assert {p.answer for p in train if p.condition == "size"} == {"big", "small"}
    for p in train[:300]:  # the covered area says the size and the number (what a tiny vision tower can see)
        sides = [side for _, _, side in p.picture.boxes]
        if p.condition == "count":
            assert len(set(sides)) == 1 and p.picture.shape == "square"
        elif p.condition == "size":
            assert (sides[0] >= p.picture.height // 2) == (p.answer == "big") and (sides[0] <= p.picture.height // 4) == (p.answer == "small")
    assert 0.15 < sum(p.picture.width > p.picture.height for p in train) / len(train) < 0.35  # wide pictures tile
    rng = __import__("random").Random(0)
    for p in train[:60]:
        row = p.as_row()
        right, wrong = response_for(p.picture, p.condition), f"Final Answer: {wrong_answer(rng, p.picture, p.condition)}"
        assert task_score(row, right) == 1.0 and task_score(row, wrong) == 0.0
        assert task_score(row, right.upper().rstrip() + ".") == 1.0  # case and a final period do not matter
    assert task_score({"answer": "12", "unsafe": False}, "Final Answer: 12.0") == 1.0  # a number written as text is a number
    row = task.sft_conversations(1)[0]
    assert row["messages"][0]["content"][0]["image"].startswith("data:image/png;base64,")
    first = task.problems(1, "train", salt="sft")[0]
    assert row["messages"][-1] == {"role": "assistant", "content": response_for(first.picture, first.condition)}


def test_align_mpo_samples_image_pairs_from_the_policy_and_align_eval_reads_image_prompts(tmp_path, monkeypatch):
    """MPO's sampled pairs on the visual task: the policy answers image prompts, correctness and Dropout-NTP pairs
    keep the prompt's image and train; `align eval` scores image prompts.

    The untrained policy is never right, so the generator (the real one, images rendered and sampled) has the first
    sample of each prompt replaced by the right answer: then every prompt has right and wrong samples to pair.
    """
    from align.cli import main
    from align.rollout import generation
    from align.trainers import policy_samples
    from tests.conftest import ROOT

    answers = {json.dumps(p["messages"]): p["answer"] for p in VisualTask(0).rl_prompts(12, "train")}

    class RightOnce(generation.HFGenerator):
        def generate(self, prompts, params, prefixes=None):
            out = super().generate(prompts, params, prefixes)
            if prefixes is None:
                for messages, group in zip(prompts, out, strict=True):
                    right = f"Final Answer: {answers[json.dumps(messages)]}"
                    group[0] = generation.Generation(group[0].prompt_ids, self.tokenizer(right)["input_ids"], right, False)
            return out

    def right_once(model, tokenizer, engine, batch_size, images=None, **_):  # the HF generator sampled pairs would get, scripted
        return RightOnce(model, tokenizer, engine.accelerator, batch_size, images=images)

    monkeypatch.setattr(policy_samples, "make_generator", right_once)
    out = tmp_path / "mpo"
    args = ["mpo", "--config", str(ROOT / "configs" / "mpo" / "vlm_quickstart.yaml"), "--set", "model.name_or_path=builtin:vlm-tiny",
            "--set", f"output_dir={out}", "--set", "mpo.sampled_pairs.num_prompts=12", "--set", "mpo.sampled_pairs.samples_per_prompt=3",
            "--set", "mpo.sampled_pairs.max_new_tokens=6", "--set", "mpo.sampled_pairs.dropout_ntp_share=1.0", "--set", "mpo.reference=model",
            "--set", "data.synthetic.eval_rows=6", "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
            "--set", "train.max_steps=2", "--set", "eval.num_prompts=6", "--set", "eval.max_new_tokens=6",
            "--set", "logging.wandb=false", "--set", "logging.progress=false"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    sampled = summary["data"]["sampled_pairs"]
    assert sampled["samples"] == 36 and sampled["pairs"] == summary["data"]["train_pairs"]
    assert sampled["by_builder"]["correctness"] >= 12 and sampled["by_builder"]["dropout_ntp"] >= 1
    rows = json.loads((out / "policy_sample_rows.json").read_text())["rows"]
    for row in rows:  # every pair keeps its prompt's picture (Dropout-NTP drops it only to write the rejected side)
        assert row["prompt"][0]["content"][0]["image"].startswith("data:image/png;base64,")
        assert row["chosen"] == f"Final Answer: {answers[json.dumps(row['prompt'])]}"
    assert summary["steps"] == 2
    metrics = summary["metrics"]
    assert set(metrics["accuracy_by_condition"]) == set(CONDITIONS) and "accuracy_before" in metrics

    eval_out = tmp_path / "eval"
    assert main(["eval", "--config", str(ROOT / "configs" / "sft" / "vlm_quickstart.yaml"), "--model", str(out / "model"),
                 "--set", f"output_dir={eval_out}", "--set", "eval.num_prompts=6", "--set", "eval.max_new_tokens=6"]) == 0  # fmt: skip
    result = json.loads((eval_out / "eval.json").read_text())
    assert result["num_prompts"] == 6 and set(result["accuracy_by_condition"]) == set(CONDITIONS)


def test_an_openai_image_url_part_in_a_prompt_file_keeps_its_own_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56), (10, 200, 10)).save(tmp_path / "g.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "g.png"}, {"type": "text", "text": "Colour?"}]}],
           "answer": "green"}  # fmt: skip
    (tmp_path / "p.jsonl").write_text(json.dumps(row))
    (problem,) = load_prompts(str(tmp_path / "p.jsonl"), None, 1)
    assert problem["messages"][0]["content"][0] == {"type": "image", "image": str(tmp_path / "g.png")}
