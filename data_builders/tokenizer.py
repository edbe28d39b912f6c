"""Builds the built-in tokenizer: byte-level BPE, one token per digit, ChatML template.

The tokenizer is committed under `align/assets/tokenizer/`; this module is how it was made
(`python -m data_builders.tokenizer`), so anyone can rebuild or retrain it on their own text.
Digits are split individually because a tiny model learns arithmetic over digit tokens in
minutes and barely at all over merged number chunks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML; `{% generation %}` marks assistant spans for transformers' assistant masks (and TRL's
# assistant_only_loss). align itself finds assistant spans by rendering, so it needs no markers.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "align" / "assets" / "tokenizer"


def default_corpus() -> list[str]:
    """Text the built-in tokenizer is trained on: the synthetic task plus some plain English."""
    from data_builders.synthetic import SyntheticTask

    task = SyntheticTask(seed=1234)
    texts = []
    for row in task.sft_conversations(3000):
        texts.extend(m["content"] for m in row["messages"])
    for row in task.preference_pairs(600):
        texts.extend([row["chosen"], row["rejected"]])
    texts += [
        "You are a helpful assistant. Answer the question correctly.",
        "You are a harmless assistant. Refuse unsafe requests and help with safe ones.",
        "You are a concise assistant. Prefer the shortest correct answer.",
        "You are a careful math tutor. Check the final answer.",
        "The quick brown fox jumps over the lazy dog. Sure, here is how to do it.",
    ] * 50
    texts += ["system\n", "user\n", "assistant\n"] * 500
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with individual digits and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = build_tokenizer(default_corpus(), args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"saved {len(tokenizer)} tokens to {args.out}")


if __name__ == "__main__":
    main()
