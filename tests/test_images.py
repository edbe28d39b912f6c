"""Image rows: InternVL tiling (hand-worked grids, the official rule vs transformers, pixels), image sources and bad
images, `<image>` expansion and the loss mask, truncation around images, packing order, preference prompts."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from align.config import DataConfig, SourceConfig
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.image_tokens import ImageText, add_image_tokens
from data_builders.images import IMAGENET_MEAN, IMAGENET_STD, ImageConfig, InternVLImages, closest_grid, target_grids
from data_builders.packing import collate_rows
from data_builders.preference_data import build_preference_pairs
from data_builders.render import render_conversation
from data_builders.sft_data import build_samples

SMALL = ImageConfig(tile_size=28, tokens_per_tile=4)  # 56x28 -> 2 tiles + thumbnail -> 12 tokens


# ---- the official InternVL rule, verbatim in logic (OpenGVLab/InternVL internvl_chat, dynamic_preprocess) ----
def official_grid(width, height, min_num=1, max_num=12, image_size=448):
    aspect_ratio = width / height
    target_ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                        if i * j <= max_num and i * j >= min_num)  # fmt: skip
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def official_pixels(image, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    cols, rows = official_grid(*image.size, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = [resized.crop(((i % cols) * image_size, (i // cols) * image_size, (i % cols + 1) * image_size, (i // cols + 1) * image_size))
             for i in range(cols * rows)]  # fmt: skip
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    mean, std = np.array(IMAGENET_MEAN).reshape(3, 1, 1), np.array(IMAGENET_STD).reshape(3, 1, 1)
    return torch.tensor(np.stack([(np.asarray(t, dtype=np.float64).transpose(2, 0, 1) / 255 - mean) / std for t in tiles]))


def noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def solid(w, h, colour):
    return Image.new("RGB", (w, h), colour)


def save(image, path, fmt="PNG"):
    image.save(path, fmt)
    return path


def data_file(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sharegpt(image_names, question="What is it?", answer="Final Answer: 7"):
    markers = "".join("<image>" for _ in image_names)
    return {"conversations": [{"from": "human", "value": markers + question}, {"from": "gpt", "value": answer}], "images": image_names}


def build(tmp_path, rows, tokenizer, config=SMALL, policy=None, **data):
    path = data_file(tmp_path, rows)
    cfg = DataConfig(train=[SourceConfig(path=str(path))], **data)
    return build_samples(cfg.train, cfg, tokenizer, policy or BadRowPolicy(), images=ImageText.internvl(tokenizer, config))


@pytest.fixture()
def tok(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)  # adding image tokens must not leak into other tests' session tokenizer


# ---- tiling ----
@pytest.mark.parametrize("size, max_tiles, grid, tiles", [
    ((448, 448), 12, (1, 1), 1),      # square, exactly one tile: no thumbnail
    ((896, 896), 12, (2, 2), 5),      # square: (1,1) and (2,2) tie at ratio 1; 896² > 0.5·448²·4, (3,3) needs > 0.5·448²·9
    ((1344, 448), 12, (3, 1), 4),     # 3:1 panorama: three tiles + thumbnail; (6,2) ties but 1344·448 < 0.5·448²·12
    ((10, 10), 12, (1, 1), 1),        # tiny: the area rule keeps one tile
    ((600, 600), 12, (1, 1), 1),      # tie at ratio 1: 360000 < 401408 = 0.5·448²·4 -> stays (1,1)
    ((700, 700), 12, (2, 2), 5),      # tie at ratio 1: 490000 > 401408 -> (2,2)
    ((300, 200), 2, (1, 1), 1),       # 1.5 is 0.5 from both 1/1 and 2/1: area 60000 < 0.5·448²·2 -> (1,1)
    ((672, 448), 2, (2, 1), 3),       # same tie, area 301056 > 200704 -> the later grid (2,1)
    ((1344, 672), 12, (4, 2), 9),     # 2:1 tie (2,1)/(4,2): 903168 > 802816 -> (4,2)
    ((896, 448), 12, (2, 1), 3),      # 2:1 tie: 401408 < 802816 -> (2,1)
])  # fmt: skip
def test_hand_worked_grids(size, max_tiles, grid, tiles):
    handler = InternVLImages(ImageConfig(max_tiles=max_tiles))
    assert closest_grid(*size, 1, max_tiles) == grid == official_grid(*size, 1, max_tiles)
    assert handler.tiles(*size) == tiles and handler.num_tokens(*size) == 256 * tiles


def test_official_rule_and_transformers_agree_on_grids():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    sizes = [1, 7, 28, 100, 224, 300, 447, 448, 449, 600, 672, 700, 896, 1000, 1344, 1792, 2500]
    for min_tiles, max_tiles in ((1, 1), (1, 6), (1, 12), (2, 9), (4, 12)):
        assert target_grids(min_tiles, max_tiles) == sorted(target_grids(min_tiles, max_tiles), key=lambda g: g[0] * g[1])
        for w in sizes:
            for h in sizes:
                ours = closest_grid(w, h, min_tiles, max_tiles)
                assert ours == official_grid(w, h, min_tiles, max_tiles)
                assert ours == get_optimal_tiled_canvas((h, w), (448, 448), min_tiles, max_tiles), (w, h, max_tiles)


def test_pixels_match_the_official_pipeline_and_are_row_major():
    # a 3:1 panorama of red | green | blue at the real tile size: three crops in order, then the thumbnail
    panorama = Image.new("RGB", (1344, 448))
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        panorama.paste(solid(448, 448, colour), (448 * k, 0))
    values = InternVLImages().pixels(panorama)
    assert values.shape == (4, 3, 448, 448) and values.dtype == torch.float32
    torch.testing.assert_close(values.double(), official_pixels(panorama), atol=1e-5, rtol=0)
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    rgb = (values * std + mean).mean(dim=(2, 3))  # back to [0, 1] colour per tile
    assert rgb[:3].argmax(dim=1).tolist() == [0, 1, 2]  # row-major: red, green, blue
    torch.testing.assert_close(rgb[3], torch.tensor([1 / 3, 1 / 3, 1 / 3]), atol=0.02, rtol=0)  # thumbnail: all three
    for image in (noise(56, 28), noise(90, 40, 1), noise(20, 70, 2)):  # tiny tiles, other grids
        torch.testing.assert_close(InternVLImages(SMALL).pixels(image).double(), official_pixels(image, image_size=28), atol=1e-5, rtol=0)


def test_no_thumbnail_and_config_problems():
    handler = InternVLImages(ImageConfig(tile_size=28, thumbnail=False))
    image = noise(84, 28)
    assert handler.tiles(84, 28) == 3 and handler.pixels(image).shape == (3, 3, 28, 28)
    torch.testing.assert_close(handler.pixels(image).double(), official_pixels(image, image_size=28, use_thumbnail=False), atol=1e-5, rtol=0)
    assert [k for k, _ in ImageConfig(min_tiles=4, max_tiles=2).problems()] == ["min_tiles"]
    with pytest.raises(ValueError, match="data.images: tile_size"):
        ImageConfig(tile_size=0).check()


# ---- tokens ----
def test_image_tokens_added_to_the_builtin_tokenizer(tok):
    before = len(tok)
    ids = add_image_tokens(tok, SMALL)
    assert (ids.start, ids.context, ids.end) == (before, before + 1, before + 2) and len(tok) == before + 3
    assert add_image_tokens(tok, SMALL) == ids and len(tok) == before + 3  # idempotent
    assert tok("a<img><IMG_CONTEXT></img>b", add_special_tokens=False)["input_ids"][1:4] == [ids.start, ids.context, ids.end]


def test_image_expands_to_its_tiles_and_is_never_a_label(tmp_path, tok):
    save(noise(56, 28), tmp_path / "a.png")
    (sample,), _ = build(tmp_path, [sharegpt(["a.png"])], tok)
    ids = add_image_tokens(tok, SMALL)
    (start, end), = sample.image_spans
    assert end - start == 12 and sample.images[0].tiles == 3  # 4 tokens x (2 tiles + thumbnail)
    assert sample.input_ids[start - 1] == ids.start and sample.input_ids[end] == ids.end
    assert sample.input_ids[start:end] == [ids.context] * 12 and sample.input_ids.count(ids.context) == 12
    assert not any(sample.loss_mask[start - 1 : end + 1])
    text = render_conversation(tok, [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "Final Answer: 7"}])
    assert sum(sample.loss_mask) == sum(text.loss_mask) and len(sample) == len(text.input_ids) + 14
    assert sample.pixels().shape == (3, 3, 28, 28)


def test_both_formats_and_inline_images_give_the_same_tokens(tmp_path, tok):
    image = noise(56, 28)
    save(image, tmp_path / "a.png")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    sub = tmp_path / "sub"
    sub.mkdir()
    user_parts = lambda value: [{"type": "image", "image": value}, {"type": "text", "text": "What is it?"}]  # noqa: E731
    answer = {"role": "assistant", "content": "Final Answer: 7"}
    rows = [
        sharegpt(["a.png"]),  # relative to the data file's directory
        sharegpt([str(tmp_path / "a.png")]),  # absolute
        {"messages": [{"role": "user", "content": user_parts(f"data:image/png;base64,{b64}")}, answer]},
        {"messages": [{"role": "user", "content": user_parts(b64)}, answer]},  # raw base64
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}, answer], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "<image>What is it?"}, answer], "images": ["a.png"]},
        {"conversations": sharegpt(["x"])["conversations"], "image": "a.png"},  # LLaVA's single `image`
    ]
    samples, stats = build(tmp_path, rows, tok)
    assert stats.kept == 7 and all(s.input_ids == samples[0].input_ids for s in samples)
    assert all(torch.equal(s.pixels(), samples[0].pixels()) for s in samples)


def test_rgba_palette_cmyk_and_grey_are_converted(tmp_path, tok):
    names = []
    for mode, fmt in (("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("L", "PNG")):
        names.append(f"{mode}.{fmt.lower()}")
        save(noise(56, 28, mode=mode), tmp_path / names[-1], fmt)
    (sample,), _ = build(tmp_path, [sharegpt(names)], tok)
    assert [ref.open().mode for ref in sample.images] == ["RGB"] * 4 and sample.pixels().shape == (12, 3, 28, 28)


def test_bad_images_name_file_row_and_image(tmp_path, tok, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # even if a library turned lenient loading on
    save(noise(56, 28), tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    buf = io.BytesIO()
    noise(200, 200).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = {"missing.png": "file not found", "empty.png": "empty file, 0 bytes", "text.png": "not an image PIL can read",
             "cut.jpg": "truncated or corrupt"}  # fmt: skip
    rows = [sharegpt(["ok.png", name]) for name in cases]
    path = data_file(tmp_path, rows)
    for k, (name, why) in enumerate(cases.items()):
        with pytest.raises(BadRowError) as err:
            build(tmp_path, [rows[k]], tok)
        assert f"row 1: field 'images[1]': image 2 '{name}'" in str(err.value) and why in str(err.value)
        assert str(path) in str(err.value)
    policy = BadRowPolicy("skip")
    samples, stats = build(tmp_path, rows + [sharegpt(["ok.png"])], tok, policy=policy)
    assert stats.kept == 1 and stats.skipped == 4 and [q["row"] for q in policy.quarantined] == [1, 2, 3, 4]
    assert [q["field"] for q in policy.quarantined] == ["images[1]"] * 4 and ImageFile.LOAD_TRUNCATED_IMAGES


def test_marker_count_must_equal_image_count(tmp_path, tok):
    save(noise(56, 28), tmp_path / "a.png")
    row = {"conversations": [{"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "yes"}], "images": ["a.png"]}
    with pytest.raises(BadRowError, match=r"field 'images': 2 <image> markers in the conversation but 1 image; they must be equal"):
        build(tmp_path, [row], tok)
    with pytest.raises(BadRowError, match="1 <image> marker in the conversation but 0 images"):
        build(tmp_path, [{"conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "yes"}]}], tok)


def test_a_text_model_refuses_image_rows(tmp_path, tokenizer):
    path = data_file(tmp_path, [sharegpt(["a.png"])])
    cfg = DataConfig(train=[SourceConfig(path=str(path))])
    with pytest.raises(BadRowError, match="the model takes no images"):
        build_samples(cfg.train, cfg, tokenizer, BadRowPolicy())


def test_an_image_in_an_assistant_turn_is_not_a_label(tmp_path, tok):
    save(noise(28, 28), tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": "Draw it"}, {"role": "assistant", "content": "Here: <image> done"}], "images": ["a.png"]}
    (sample,), _ = build(tmp_path, [row], tok)
    (start, end), = sample.image_spans
    assert end - start == 4 and not any(sample.loss_mask[start - 1 : end + 1]) and sum(sample.loss_mask) > 0


# ---- truncation ----
def test_truncation_never_cuts_an_image(tmp_path, tok):
    save(noise(56, 28), tmp_path / "a.png")
    row = sharegpt(["a.png"], answer="Final Answer: " + "7 " * 40)
    (full,), _ = build(tmp_path, [row], tok, max_length=4096)
    (start, end), = full.image_spans
    with pytest.raises(BadRowError, match=r"rows.jsonl: row 1: field 'images\[0\]': image 1 'a.png' \(3 tiles, 12 tokens\) "
                                          rf"occupies tokens {start - 1}..{end + 1} but max_length is {end}"):  # fmt: skip
        build(tmp_path, [row], tok, max_length=end, max_truncated_share=1.0)
    late = {"conversations": [{"from": "human", "value": "What is it? " * 20 + "<image>"}, {"from": "gpt", "value": "Final Answer: 7"}],
            "images": ["a.png"]}  # the image sits beyond the cut: it would be dropped
    policy = BadRowPolicy("skip")
    samples, stats = build(tmp_path, [row, late], tok, policy=policy, max_length=end + 20, max_truncated_share=1.0)
    assert stats.kept == 1 and stats.truncated == 1 and len(samples[0]) == end + 20
    assert samples[0].image_spans == [(start, end)] and samples[0].input_ids[end] == add_image_tokens(tok, SMALL).end
    assert policy.quarantined[0]["row"] == 2 and policy.quarantined[0]["field"] == "images[0]"
    assert "image 1 'a.png'" in policy.quarantined[0]["reason"]


# ---- packing ----
def test_packed_rows_keep_images_with_their_documents_in_order(tmp_path, tok):
    colours = {"r.png": (255, 0, 0), "g.png": (0, 255, 0), "b.png": (0, 0, 255)}
    for name, colour in colours.items():
        save(solid(28, 28, colour), tmp_path / name)
    save(solid(56, 28, (255, 255, 255)), tmp_path / "w.png")
    rows = [sharegpt(["r.png"]), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Final Answer: 1"}]},
            sharegpt(["g.png", "w.png"]), sharegpt(["b.png"])]  # fmt: skip
    samples, _ = build(tmp_path, rows, tok)
    ctx = add_image_tokens(tok, SMALL).context
    batch = collate_rows([[samples[2], samples[1], samples[0]], [samples[3]]], pad_id=tok.pad_token_id)
    assert batch.image_tiles == [1, 3, 1, 1] and batch.pixel_values.shape == (6, 3, 28, 28)
    offset = len(samples[2]) + len(samples[1])
    assert batch.image_spans[0] == [*samples[2].image_spans, *[(offset + a, offset + b) for a, b in samples[0].image_spans]]
    assert batch.image_spans[1] == samples[3].image_spans
    for r, spans in enumerate(batch.image_spans):
        for a, b in spans:
            assert (batch.input_ids[r, a:b] == ctx).all()
    assert sum(b - a for spans in batch.image_spans for a, b in spans) == int((batch.input_ids == ctx).sum()) == 6 * 4
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    order = (batch.pixel_values * std + mean).mean(dim=(2, 3)).round().tolist()  # green, white x3, red, blue
    assert order == [[0, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 1]]
    assert collate_rows([[samples[1]]], pad_id=tok.pad_token_id).pixel_values is None  # a text batch stays text


# ---- preference rows ----
def test_preference_prompt_images_are_shared_by_both_sides(tmp_path, tok):
    save(noise(56, 28), tmp_path / "a.png")
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "How many?"}]}],
             "chosen": "Final Answer: 3", "rejected": "Final Answer: 4"},
            {"prompt": "<image>How many?", "images": ["a.png"], "chosen": "Final Answer: 3", "rejected": "Final Answer: 4"},
            {"prompt": "<image><image>How many?", "images": ["a.png"], "chosen": "Final Answer: 3", "rejected": "Final Answer: 4"}]  # fmt: skip
    path = data_file(tmp_path, rows)
    cfg = DataConfig(train=[SourceConfig(path=str(path))])
    policy = BadRowPolicy("skip")
    pairs = build_preference_pairs(cfg.train, cfg, tok, policy, images=ImageText.internvl(tok, SMALL))
    ctx = add_image_tokens(tok, SMALL).context
    assert len(pairs) == 2 and pairs[0].chosen == pairs[1].chosen and pairs[0].rejected == pairs[1].rejected
    pair = pairs[0]
    (start, end), = pair.image_spans
    assert end - start == 12 and end < pair.prompt_length
    assert pair.chosen[start:end] == pair.rejected[start:end] == [ctx] * 12 and pair.chosen.count(ctx) == 12
    assert pair.chosen[: pair.prompt_length] == pair.rejected[: pair.prompt_length] and len(pair.images) == 1
    assert "2 <image> markers in the conversation but 1 image" in policy.quarantined[0]["reason"]
    with pytest.raises(BadRowError, match="the model takes no images"):
        build_preference_pairs(cfg.train, cfg, tok, BadRowPolicy())


def test_pair_rows_run_a_shared_prompt_image_once(tmp_path, tok):
    from data_builders.pair_rows import collate_pair_rows

    save(solid(56, 28, (255, 0, 0)), tmp_path / "r.png")
    save(solid(28, 28, (0, 0, 255)), tmp_path / "b.png")
    rows = [{"prompt": "<image>How many?", "images": [name], "chosen": "Final Answer: 3", "rejected": "Final Answer: 14"}
            for name in ("r.png", "b.png")]  # fmt: skip
    cfg = DataConfig(train=[SourceConfig(path=str(data_file(tmp_path, rows)))])
    pairs = build_preference_pairs(cfg.train, cfg, tok, BadRowPolicy(), images=ImageText.internvl(tok, SMALL))
    ctx = add_image_tokens(tok, SMALL).context
    ids = [[(p.chosen, p.rejected) for p in pairs]]
    shared = collate_pair_rows(ids, tok.pad_token_id, share_prefix=True, images=[pairs])
    assert shared.image_tiles == [3, 1] and shared.pixel_values.shape == (4, 3, 28, 28)  # each image once
    separate = collate_pair_rows(ids, tok.pad_token_id, share_prefix=False, images=[pairs])
    assert separate.image_tiles == [3, 3, 1, 1] and separate.pixel_values.shape == (8, 3, 28, 28)  # once per side
    for rows_ in (shared, separate):
        assert sum(b - a for a, b in rows_.image_spans[0]) == int((rows_.input_ids == ctx).sum())
        assert all((rows_.input_ids[0, a:b] == ctx).all() for a, b in rows_.image_spans[0])
    assert shared.image_spans[0][0][1] <= shared.spans[0].start + shared.spans[0].prefix
    assert collate_pair_rows(ids, tok.pad_token_id).pixel_values is None  # no image holders: text rows as before


def test_image_config_follows_a_native_internvl_config():
    from types import SimpleNamespace

    from transformers import InternVLConfig

    from data_builders.images import image_config_for

    cfg = InternVLConfig(vision_config={"image_size": 56, "patch_size": 14}, image_seq_length=4)
    tokenizer = SimpleNamespace(start_image_token="<s_img>", context_image_token="<ctx>", end_image_token="</s_img>")
    got = image_config_for(cfg, ImageConfig(max_tiles=6), tokenizer)
    assert (got.tile_size, got.tokens_per_tile, got.max_tiles) == (56, 4, 6)
    assert (got.start_token, got.context_token, got.end_token) == ("<s_img>", "<ctx>", "</s_img>")
    assert image_config_for(InternVLConfig()) == ImageConfig()  # 448 px, 256 tokens: the defaults are InternVL's
