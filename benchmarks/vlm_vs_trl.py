"""VLM throughput and memory: align's SFT and MPO against TRL's `SFTTrainer` and `DPOTrainer` on `builtin:internvl-tiny`.

Both sides train the same randomly initialised tiny InternVL (native transformers `InternVLForConditionalGeneration`,
align's `builtin:internvl-tiny`, built by `align.engine.models.load_causal_lm` with the same seed: the parent checks
the weight fingerprints agree) on the same rows of the visual task (`data_builders.visual_task.VisualTask`: inline
base64 PNG pictures in OpenAI content parts, a quarter twice as wide as high), with InternVL's dynamic tiling at
`--max-tiles` (2: a wide picture is 2 tiles + a thumbnail, a square one 1 tile), fp32, the same optimizer (AdamW,
same lr/betas/eps, no weight decay), schedule, step count and torch threads, no gradient checkpointing. Two parts:

1. SFT: align's `SFTTrainer` (packed best-fit rows of `--max-length`, loss on assistant tokens) against TRL's
   `SFTTrainer` (loss on assistant tokens via the template's `{% generation %}` markers). `--max-length` is 256 (16 rows
   per step, ~95 conversations of ~40-55 tokens): on CPU sdpa applies align's block-diagonal mask to whole rows, so a
   step's attention grows with the row length (512-token rows measured ~20% fewer tokens/s); TRL never truncates at it.
2. MPO: align's `MPOTrainer` (shared-prefix pair rows of `--row-tokens`, the prompt and its image once per pair, a live
   frozen reference, `mpo.running_delta=false`) against TRL's `DPOTrainer` with `loss_type=["sigmoid", "bco_pair",
   "sft"]`, `loss_weights=[0.8, 0.2, 1.0]`, beta 0.1 (TRL's bco_pair has no running delta: with it off both sides
   optimise the same objective), a live frozen reference (`precompute_ref_log_probs` is refused for vision datasets).

How TRL takes the images: TRL 1.16 needs a processor (`processing_class`) for a vision-language model. transformers'
`InternVLProcessor` requires a video processor, which needs torchvision (not importable beside the CPU torch here), so
`internvl_processor` builds the same processor without it: `InternVLProcessor`'s own `__call__` (each `<IMG_CONTEXT>`
becomes `<img>` + `<IMG_CONTEXT>` x tokens-per-tile x tiles + `</img>`) over `GotOcr2ImageProcessorPil(crop_to_patches=True,
min_patches=1, max_patches=--max-tiles)` (the PIL image processor, ImageNet mean/std, tile side from the model) and the
built-in tokenizer, whose chat template is the tokenizer's own with content parts rendered (an image part is
`<IMG_CONTEXT>`). For MPO the template also drops the newline the built-in template writes after an assistant turn's
`<|im_end|>`: align's responses end at the end-of-turn token (`data_builders/render.py`), so without it TRL would train
one token more per sequence. TRL's rows are its standard vision format (an `images` column of PIL images, string
contents; the image goes before the first user text, where the visual task puts it) and run through TRL's own
collators (`DataCollatorForVisionLanguageModeling`, `DataCollatorForVisionPreference`), loss and step.

Same tokens, same batches: the TRL child gets align's step plan (which documents / pairs align trained at each step) and
trains exactly those in each step (a batch sampler over its dataset; TRL's batch is still padded to its longest row). The
parent then checks, step by step, that both sides trained identical documents (token ids and loss positions; pairs:
chosen, rejected, prompt length), the same non-pad tokens, image tokens and loss tokens, and stops if they differ.
The first step's losses should then agree to ~1e-5 (same weights, same documents, same loss).

TRL's fastest correct setting: TRL refuses packing and padding-free for vision datasets (SFT: `ValueError`; DPO:
padding-free disabled in 1.16), so it pads each batch to its longest row (right-padded; DPO flushes left); fp32 (bf16 is
far slower on a CPU without AVX-512 BF16; the header says whether this one has it), no gradient checkpointing, no
logging/eval/saving, `dataloader_num_workers=0`.

Tokens/s counts the tokens each side trains on in the same unit: SFT the documents' tokens (align: non-pad tokens of its
packed rows; TRL: its attention mask), MPO len(prompt + chosen) + len(prompt + rejected) (TRL: its attention mask;
align feeds fewer, the shared prefix once: `fed`), over the wall time of the steps after `--warmup` (collation included,
model/data setup not). Each side runs in its own subprocess, so peak RSS (`ru_maxrss`) is its own. `--threads` is the
torch thread count of both sides (2, as the other benchmarks); on a machine whose cores are busy with other jobs, use 1:
OpenMP threads then wait on each other in every op and 2 threads ran this tiny model 15-70x slower than 1. Printed last:
`RESULT align/trl tokens_per_s=<ratio> peak_rss=<ratio>` (SFT) and `RESULT mpo align/trl tokens_per_s=<ratio>
peak_rss=<ratio>`. CPU only.

    python benchmarks/vlm_vs_trl.py --quick          # 8 steps: ~40 s on 2 CPU cores (threads 1; minutes at 2 threads on busy cores)
    python benchmarks/vlm_vs_trl.py --smoke          # 2 steps per side on small batches (tests/test_benchmarks_vlm.py)
    python benchmarks/vlm_vs_trl.py --threads 1      # 25 steps
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rm_vs_trl import digest  # noqa: E402
from sft_vs_trl import REPO, align_step_times, run_child, side_result, steady_rate, step_timer, trl_training_args  # noqa: E402

MODEL = "builtin:internvl-tiny"
METHODS = ("sft", "mpo")
MPO_LOSSES = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
BETA = 0.1
# no lr warm-up on either side, so the schedules agree step for step (align's warm-up starts at lr/warmup, transformers' at 0)
WARMUP_STEPS = 0
COUNTS = ("tokens", "image_tokens", "loss_tokens")  # must agree step by step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a few minutes on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="2 steps per side, 1 not timed (a test that it runs; figures mean little)")
    p.add_argument("--method", choices=["sft", "mpo", "both"], default="both")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per side (default 2 smoke, 8 quick, 25 full)")
    p.add_argument("--warmup", type=int, default=None, help="leading steps left out of tokens/s (default 1 smoke, else 2)")
    p.add_argument("--batch", type=int, default=None, help="align: packed rows per step, TRL: the documents / pairs these hold "
                   "(default SFT 16, MPO 8; --smoke 4 / 2)")
    p.add_argument("--max-length", type=int, default=256, help="SFT: align's row length and TRL's max_length; MPO: per sequence")
    p.add_argument("--row-tokens", type=int, default=256, help="MPO: align's tokens per packed pair row (data.pair_row_tokens)")
    p.add_argument("--max-tiles", type=int, default=2, help="InternVL dynamic tiling: most tiles per image (+ a thumbnail when > 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--mpo-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0, help="model init, data and shuffling")
    p.add_argument("--child", choices=["align", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)  # TRL child: the align child's JSON (its steps' documents)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 8 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    args.batch = args.batch or {"sft": 16, "mpo": 8, "both": 8}[args.method] // (4 if args.smoke else 1)
    # enough rows that no step repeats one: conversations are ~40-55 tokens, ~5.5 pairs fill a 256-token pair row
    args.rows = args.steps * args.batch * max(2, args.max_length // 32) if args.method == "sft" else args.steps * args.batch * 8
    args.lr = args.sft_lr if args.method == "sft" else args.mpo_lr  # trl_training_args reads args.lr
    return args


# ----------------------------------------------------------------------------- data
def task_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The visual task's rows (align reads them as they are): SFT conversations or preference pairs."""
    from data_builders.visual_task import VisualTask

    task = VisualTask(args.seed)
    return task.sft_conversations(args.rows) if args.method == "sft" else task.preference_pairs(args.rows)


def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI content parts -> TRL's vision format: string contents and the images apart (TRL puts them before the first
    user text, so an image must come first in the first user turn, as the visual task writes it)."""
    from PIL import Image

    out, images = [], []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = m["content"]
        shown = [p for p in parts if p["type"] == "image"]
        assert all(p["type"] == "image" for p in parts[: len(shown)]) and not (shown and images), "images first in the first user turn"
        for p in shown:
            data = p["image"].split(",", 1)[1] if p["image"].startswith("data:") else p["image"]
            images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        out.append({"role": m["role"], "content": "".join(p["text"] for p in parts if p["type"] == "text")})
    return out, images


def trl_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for row in task_rows(args):
        if args.method == "sft":
            messages, images = split_images(row["messages"])
            rows.append({"images": images, "messages": messages})
        else:
            prompt, images = split_images(row["prompt"])
            rows.append({"images": images, "prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                         "rejected": [{"role": "assistant", "content": row["rejected"]}]})  # fmt: skip
    return rows


def key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def doc_key(ids: list[int], loss_positions: list[int]) -> str:
    """One SFT document: its token ids and the positions whose token is a loss target."""
    return key(ids, loss_positions)


def pair_key(chosen: list[int], rejected: list[int], prompt_length: int) -> str:
    return key(chosen, rejected, prompt_length)


def step_key(keys: list[str]) -> str:
    return key(sorted(keys))


# ----------------------------------------------------------------------------- align
def align_recipe(args: argparse.Namespace, work: Path, data: Path) -> Any:
    from align.config import MPORecipe, SFTRecipe, load_recipe
    from data_builders.visual_task import CONDITIONS

    common = [
        f"output_dir={work / 'align'}", f"model.name_or_path={MODEL}", "model.dtype=float32", "model.gradient_checkpointing=false",
        "model.lora.enabled=false", f"data.train=[{{path: {data}}}]", "data.eval=[]", "data.packing=true", "data.system_prompt=null",
        f"data.images.max_tiles={args.max_tiles}", "data.images.min_tiles=1",
        f"optim={{lr: {args.lr}, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8, schedule: cosine, warmup_steps: {WARMUP_STEPS}, warmup_ratio: 0.0, "
        "min_lr_ratio: 0.1, max_grad_norm: 1.0}",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.seed={args.seed}", "train.log_every=1", "train.resume=false", "train.save_every=0", "train.eval_every=0",
        "logging.wandb=false", "logging.progress=false", "eval.enabled=false",
    ]  # fmt: skip
    if args.method == "sft":
        overrides = [*common, f"data.max_length={args.max_length}", "data.loss_reduction=token"]
        return load_recipe(SFTRecipe, REPO / "configs/sft/quickstart.yaml", overrides)
    losses = ", ".join(f"{k}: {v}" for k, v in MPO_LOSSES.items())
    overrides = [*common, f"data.max_length={args.max_length}", f"data.pair_row_tokens={args.row_tokens}", f"mpo.beta={BETA}",
                 f"mpo.losses={{{losses}}}", "mpo.running_delta=false", "mpo.reference=model", "mpo.sampled_pairs.enabled=false",
                 f"mpo.conditions=[{', '.join(CONDITIONS)}]"]  # fmt: skip
    return load_recipe(MPORecipe, REPO / "configs/mpo/quickstart.yaml", overrides)


def run_align(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    os.cpu_count = lambda: args.threads  # align's Engine sizes torch threads from the CPU count
    from align.runner import run_job

    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(args)))
    seen: dict[str, Any] = {"plan": [], "batches": []}

    if args.method == "sft":
        from align.trainers.sft import SFTTrainer as Base
    else:
        from align.trainers.mpo import MPOTrainer as Base

    class Measured(Base):  # records, changes nothing
        def setup(self) -> None:
            super().setup()
            seen.update(trainer=self, weights=digest(self.model, [])["weights"], image_ids=sorted(self.images.ids.all))

        def collate(self, row_ids: Any, split: str = "train") -> Any:
            batch = super().collate(row_ids, split)
            if split == "train" and args.method == "sft":
                seen["plan"].append([i for r in row_ids for i in self.train_rows[r]])
                seen["batches"].append((batch.input_ids, batch.targets, batch.doc_ids, 0 if batch.pixel_values is None else batch.pixel_values.shape[0]))
            elif split == "train":
                seen["plan"].append(list(batch.pair_ids))
                seen["batches"].append((batch.rows.sequence_tokens, batch.rows.num_tokens, 0 if batch.rows.pixel_values is None else batch.rows.pixel_values.shape[0]))
            return batch

    summary = run_job(Measured, align_recipe(args, work, data))
    trainer = seen["trainer"]
    fed, ends, records = align_step_times(work / "align" / "metrics.jsonl")
    image_ids = torch.tensor(seen["image_ids"])
    counts: dict[str, list[int]] = {k: [] for k in (*COUNTS, "tiles", "fed")}
    keys = []
    if args.method == "sft":
        samples = trainer.samples
        for docs, (input_ids, targets, doc_ids, tiles) in zip(seen["plan"], seen["batches"], strict=True):
            real = doc_ids >= 0
            counts["tokens"].append(int(real.sum()))
            counts["fed"].append(int(real.sum()))
            counts["image_tokens"].append(int((torch.isin(input_ids, image_ids) & real).sum()))
            counts["loss_tokens"].append(int((targets != -100).sum()))
            counts["tiles"].append(tiles)
            keys.append(step_key([doc_key(samples[i].input_ids, [t for t, m in enumerate(samples[i].loss_mask) if m]) for i in docs]))
        config = f"packed best-fit, {args.batch} rows <= {args.max_length}"
    else:
        pairs, ids = trainer.pairs, set(seen["image_ids"])
        for step_pairs, (sequence_tokens, fed_tokens, tiles) in zip(seen["plan"], seen["batches"], strict=True):
            chosen = [pairs[i] for i in step_pairs]
            counts["tokens"].append(sequence_tokens)
            counts["fed"].append(fed_tokens)
            counts["image_tokens"].append(sum(t in ids for p in chosen for t in (*p.chosen, *p.rejected)))
            counts["loss_tokens"].append(sum(len(p.chosen) + len(p.rejected) - 2 * p.prompt_length for p in chosen))
            counts["tiles"].append(tiles)
            keys.append(step_key([pair_key(p.chosen, p.rejected, p.prompt_length) for p in chosen]))
        config = f"shared-prefix pairs, {args.batch} rows <= {args.row_tokens}"
    assert len(counts["tokens"]) == len(ends), (len(counts["tokens"]), len(ends))  # one collate per step (micro = global batch)
    rate = steady_rate(counts["tokens"], ends, 0.0, args.warmup)
    return {**rate, **counts, "keys": keys, "plan": seen["plan"], "steps": summary["steps"], "weights": seen["weights"],
            "losses": [r["loss"] for r in records], "threads": torch.get_num_threads(), "config": config,
            "params": sum(p.numel() for p in trainer.model.parameters())}  # fmt: skip


# ----------------------------------------------------------------------------- TRL
def processor_template(tokenizer: Any, image_token: str, end_at_end_of_turn: bool) -> str:
    """The tokenizer's own chat template with content parts (an image part is one `image_token`, text parts their text);
    `end_at_end_of_turn`: nothing after an assistant turn's end-of-turn token (align's response end)."""
    own = tokenizer.chat_template
    macro = ("{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for part in content %}"
             f"{{% if part['type'] == 'image' %}}{image_token}{{% else %}}{{{{ part['text'] }}}}{{% endif %}}"
             "{% endfor %}{% endif %}{% endmacro %}")  # fmt: skip
    template = macro + own.replace("message['content']", "render(message['content'])")
    if end_at_end_of_turn:
        turn_end = "{% endgeneration %}{{ '\\n' }}"
        assert turn_end in template, "the built-in template changed: update processor_template"
        template = template.replace(turn_end, "{% endgeneration %}")
    return template


def internvl_processor(tokenizer: Any, model: Any, max_tiles: int, end_at_end_of_turn: bool) -> Any:
    """transformers' `InternVLProcessor` without its video processor (which needs torchvision): the same `__call__`
    (image token expansion, pixel values in image order) over the PIL image processor and the tokenizer."""
    import re

    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    from data_builders.images import IMAGENET_MEAN, IMAGENET_STD

    class InternVLImageProcessor(InternVLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256, chat_template: Any = None):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token, self.image_token, self.video_token = "<img>", "</img>", "<IMG_CONTEXT>", None
            self.start_image_token_id, self.end_image_token_id, self.image_token_id = (
                tokenizer.convert_tokens_to_ids(t) for t in (self.start_image_token, self.end_image_token, self.image_token))
            self.multimodal_pattern = re.compile(f"(?P<image>{re.escape(self.image_token)})")

    vision = model.config.vision_config
    tile = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    images = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=max_tiles, size={"height": tile, "width": tile},
                                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))  # fmt: skip
    template = processor_template(tokenizer, "<IMG_CONTEXT>", end_at_end_of_turn)
    processor = InternVLImageProcessor(images, tokenizer, image_seq_length=model.config.image_seq_length, chat_template=template)
    assert processor.image_token_id == model.config.image_token_id, (processor.image_token_id, model.config.image_token_id)
    return processor


def run_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import datasets
    import torch
    from torch.utils.data import DataLoader

    from align.config import ModelConfig
    from align.engine.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name_or_path=MODEL)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer, torch.float32, seed=args.seed)  # as align's trainers load it (image tokens added)
    weights = digest(model, [])["weights"]
    processor = internvl_processor(tokenizer, model, args.max_tiles, end_at_end_of_turn=args.method == "mpo")
    plan = json.loads(Path(args.plan).read_text())["plan"]  # align's steps: which rows each trained
    batch = round(statistics.fmean(len(s) for s in plan))  # for TRL's bookkeeping; the batches are the plan's
    dataset = datasets.Dataset.from_list(trl_rows(args))
    common = dict(**{**trl_training_args(args, work), "warmup_steps": WARMUP_STEPS}, per_device_train_batch_size=batch, bf16=False, use_cpu=True, max_length=args.max_length)
    recorded: list[dict[str, Any]] = []
    losses: list[float] = []
    timer = step_timer()

    class Planned:  # TRL's trainer, fed align's step plan (its own collator, loss and step)
        def get_train_dataloader(self) -> Any:
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=plan, collate_fn=self.data_collator, num_workers=0))

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            pixels = inputs.get("pixel_values")
            recorded.append({k: inputs[k] for k in ("input_ids", "attention_mask", "labels", "completion_mask") if k in inputs}
                            | {"tiles": 0 if pixels is None else pixels.shape[0]})  # fmt: skip
            loss = super().training_step(model, inputs, *rest, **kw)
            losses.append(float(loss))
            return loss

    if args.method == "sft":
        from trl import SFTConfig, SFTTrainer

        class CountingSFTTrainer(Planned, SFTTrainer):
            pass

        config = SFTConfig(**common, assistant_only_loss=True, packing=False, padding_free=False)
        trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor, callbacks=[timer])
        trainer_config = f"padded, batch {min(map(len, plan))}-{max(map(len, plan))} conversations"
    else:
        import copy

        from trl import DPOConfig, DPOTrainer

        class CountingDPOTrainer(Planned, DPOTrainer):
            pass

        reference = copy.deepcopy(model).eval()
        config = DPOConfig(**common, beta=BETA, loss_type=list(MPO_LOSSES), loss_weights=list(MPO_LOSSES.values()), precompute_ref_log_probs=False)
        trainer = CountingDPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset, processing_class=processor, callbacks=[timer])
        trainer_config = f"padded, batch {min(map(len, plan))}-{max(map(len, plan))} pairs (x2 rows)"
    trainer.train()

    image_ids = torch.tensor([processor.start_image_token_id, processor.image_token_id, processor.end_image_token_id])
    counts: dict[str, list[int]] = {k: [] for k in (*COUNTS, "tiles", "fed")}
    keys = []
    for inputs in recorded:
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        counts["tokens"].append(int(mask.sum()))
        counts["fed"].append(int(mask.sum()))
        counts["image_tokens"].append(int((torch.isin(ids, image_ids) & mask).sum()))
        counts["tiles"].append(inputs["tiles"])
        rows = [ids[r][mask[r]].tolist() for r in range(ids.shape[0])]
        if args.method == "sft":
            trained = inputs["labels"] != -100
            counts["loss_tokens"].append(int(trained.sum()))
            keys.append(step_key([doc_key(row, trained[r][mask[r]].nonzero().flatten().tolist()) for r, row in enumerate(rows)]))
        else:
            completion = inputs["completion_mask"].bool() & mask
            counts["loss_tokens"].append(int(completion.sum()))
            n = ids.shape[0] // 2  # chosen rows, then rejected rows in the same order
            prompt = [int((mask[r] & ~completion[r]).sum()) for r in range(2 * n)]
            assert prompt[:n] == prompt[n:], "chosen and rejected of a pair share the prompt"
            keys.append(step_key([pair_key(rows[i], rows[n + i], prompt[i]) for i in range(n)]))
    rate = steady_rate(counts["tokens"], timer.ends, timer.start, args.warmup)
    return {**rate, **counts, "keys": keys, "steps": len(timer.ends), "weights": weights, "losses": losses,
            "threads": torch.get_num_threads(), "config": trainer_config, "params": sum(p.numel() for p in model.parameters())}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    result = side_result(args, run_align, run_trl, f"vlm_vs_trl_{args.method}")
    Path(args.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def compare(method: str, a: dict[str, Any], t: dict[str, Any]) -> list[str]:
    """What the two sides trained differently (empty when they trained the same documents, step by step)."""
    problems = []
    if a["weights"] != t["weights"]:
        problems.append(f"initial weights differ ({a['weights']} vs {t['weights']})")
    if len(a["tokens"]) != len(t["tokens"]):
        problems.append(f"steps differ ({len(a['tokens'])} vs {len(t['tokens'])})")
    for name in COUNTS:
        if sum(a[name]) != sum(t[name]) or a[name] != t[name]:
            problems.append(f"{name} differ: align {a[name]}, TRL {t[name]}")
    same = sum(x == y for x, y in zip(a["keys"], t["keys"], strict=False))
    if same != len(a["keys"]):
        problems.append(f"only {same} of {len(a['keys'])} steps trained identical {'documents' if method == 'sft' else 'pairs'}")
    return problems


def spawn(args: argparse.Namespace, method: str, side: str, work: Path) -> dict[str, Any]:
    out = work / f"{method}-{side}.json"
    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--method", method, "--child", side]
    if side == "trl":
        extra += ["--plan", str(work / f"{method}-align.json")]
    before = os.getloadavg()[0]
    result = run_child(__file__, extra, f"{method} {side}: {args.steps} steps", out)
    return {**result, "load": (before, os.getloadavg()[0])}


def report(method: str, args: argparse.Namespace, a: dict[str, Any], t: dict[str, Any]) -> None:
    unit = "document tokens" if method == "sft" else "len(prompt + chosen) + len(prompt + rejected)"
    print(f"\n{method.upper()}: tokens = {unit} over all steps; fed = non-pad positions fed to the model; tiles = image tiles fed; "
          "load = 1-minute load average before/after the side")
    print(f"{'side':<6} {'configuration':<40} {'steps':>5} {'tokens':>7} {'image tok':>9} {'loss tok':>8} {'fed':>7} {'tiles':>6} "
          f"{'tokens/s':>9} {'median step':>12} {'peak RSS MiB':>13} {'loss first':>11} {'loss last':>10} {'load':>11}")  # fmt: skip
    for side, r in (("align", a), ("trl", t)):
        print(f"{side:<6} {r['config']:<40} {r['steps']:>5} {sum(r['tokens']):>7} {sum(r['image_tokens']):>9} {sum(r['loss_tokens']):>8} "
              f"{sum(r['fed']):>7} {sum(r['tiles']):>6} {r['tokens_per_s']:>9.0f} {r['median_step_tokens_per_s']:>12.0f} "
              f"{r['peak_rss_mib']:>13.0f} {r['losses'][0]:>11.5f} {r['losses'][-1]:>10.5f} {r['load'][0]:>5.2f}/{r['load'][1]:<5.2f}")  # fmt: skip
    docs = sum(len(s) for s in a["plan"])
    print(f"same tokens: {len(a['keys'])} of {len(a['keys'])} steps identical on both sides ({docs} {'conversations' if method == 'sft' else 'pairs'}); "
          f"per {'conversation' if method == 'sft' else 'pair'}: {sum(a['tokens']) / docs:.2f} tokens, {sum(a['image_tokens']) / docs:.2f} image "
          f"tokens, {sum(a['loss_tokens']) / docs:.2f} loss tokens (both sides); first-step loss |align - TRL| = "
          f"{abs(a['losses'][0] - t['losses'][0]):.2e}")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    methods = METHODS if args.method == "both" else (args.method,)
    bf16 = "has AVX-512 BF16, bf16 not measured" if has_avx512_bf16() else "no AVX-512 BF16 on this CPU"
    print(f"{MODEL} on cpu (fp32; {bf16}), tiles <= {args.max_tiles} (+ thumbnail), {args.steps} steps of which the first "
          f"{args.warmup} are not timed, {args.threads} torch threads, no lr warm-up; MPO loss "
          f"{' + '.join(f'{w} {k}' for k, w in MPO_LOSSES.items())}, beta {BETA}, live reference")  # fmt: skip
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="vlm_vs_trl_") as tmp:
        for method in methods:
            results[method] = (spawn(args, method, "align", Path(tmp)), spawn(args, method, "trl", Path(tmp)))
    failed = False
    for method, (a, t) in results.items():
        report(method, args, a, t)
        problems = compare(method, a, t)
        for problem in problems:
            print(f"MISMATCH ({method}): {problem}")
        failed = failed or bool(problems)
    if failed:
        raise SystemExit("the two sides did not train the same tokens: no ratio")
    print()
    for method, (a, t) in results.items():
        name = "" if method == "sft" else "mpo "
        print(f"RESULT {name}align/trl tokens_per_s={a['tokens_per_s'] / t['tokens_per_s']:.3f} peak_rss={a['peak_rss_mib'] / t['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
