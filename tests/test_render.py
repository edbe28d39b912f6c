"""Assistant-only masks from rendering + diffing, for templates with and without {% generation %}."""

import pytest
from transformers import AutoTokenizer

from data_builders.preference_data import tokenize_preference
from data_builders.render import render_conversation, through_end_of_turn
from rewards.conditions import render_for_reward

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


# A Llama-3-style template: nothing after the end-of-turn marker.
NO_NEWLINE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["builtin", "zephyr", "no-newline"])
def test_responses_end_at_the_end_of_turn_token_and_differ_from_trl_by_the_template_newline_only(tokenizer, tmp_path, template):
    """The deliberate difference (data_builders/render.py): TRL 1.16 tokenises the whole template (reward_trainer.py and
    dpo_trainer.py `tokenize_fn`: `apply_chat_template(..., tokenize=True)`), so its RM scores at the newline after the
    end-of-turn token and its DPO completion includes it; align stops at the end-of-turn token. SFT keeps the newline
    as input but not as a target."""
    tok = tokenizer
    if template != "builtin":
        tokenizer.save_pretrained(tmp_path)
        tok = AutoTokenizer.from_pretrained(tmp_path)
        tok.chat_template = ZEPHYR if template == "zephyr" else NO_NEWLINE
    prompt = [{"role": "user", "content": "What is 12+30?"}]
    conversation = [*prompt, {"role": "assistant", "content": "Final Answer: 42"}]
    trl_ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    trl_prompt = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    trailing = trl_ids[len(through_end_of_turn(tok, trl_ids)) :]
    assert tok.decode(trailing).strip() == "" and bool(trailing) == (template != "no-newline")

    reward_ids = render_for_reward(tok, {}, None, prompt, "Final Answer: 42")
    assert reward_ids + trailing == trl_ids  # TRL scores at trl_ids[-1]; align at the end-of-turn token
    assert tok.decode(reward_ids).endswith("<|im_end|>" if template == "builtin" else "<|endoftext|>")
    if template == "builtin":
        assert reward_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")

    pair = tokenize_preference(tok, prompt, "Final Answer: 42", "Final Answer: 41", 256, "right")
    assert pair.prompt_length == len(trl_prompt)
    assert pair.chosen[pair.prompt_length :] + trailing == trl_ids[len(trl_prompt) :]  # TRL's DPO completion ids

    sft = render_conversation(tok, conversation)
    assert sft.input_ids == trl_ids
    assert sft.loss_mask[len(reward_ids) - 1] == 1 and sft.loss_mask[len(reward_ids) :] == [0] * len(trailing)
