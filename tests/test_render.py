"""Assistant-only masks from rendering + diffing, for templates with and without {% generation %}."""

from transformers import AutoTokenizer

from data_builders.render import render_conversation

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12+30?"},
    {"role": "assistant", "content": "Final Answer: 42"},
    {"role": "user", "content": "And 1+1?"},
    {"role": "assistant", "content": "Final Answer: 2"},
]
# A Zephyr-style template: no generation markers, EOS after every turn.
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|endoftext|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def masked_text(tok, rendered):
    pieces, current = [], []
    for tid, m in zip(rendered.input_ids, rendered.loss_mask):
        if m:
            current.append(tid)
        elif current:
            pieces.append(tok.decode(current))
            current = []
    if current:
        pieces.append(tok.decode(current))
    return pieces


def test_chatml_mask_matches_generation_markers(tokenizer):
    rendered = render_conversation(tokenizer, CONV)
    reference = tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert rendered.input_ids == reference["input_ids"]
    assert rendered.loss_mask == reference["assistant_masks"]
    assert masked_text(tokenizer, rendered) == ["Final Answer: 42<|im_end|>", "Final Answer: 2<|im_end|>"]


def test_template_without_generation_markers(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tok.chat_template = ZEPHYR
    rendered = render_conversation(tok, CONV)
    assert masked_text(tok, rendered) == ["Final Answer: 42<|endoftext|>", "Final Answer: 2<|endoftext|>"]
    # nothing from system or user turns is a target
    assert sum(rendered.loss_mask) == len(tok("Final Answer: 42<|endoftext|>Final Answer: 2<|endoftext|>")["input_ids"])
