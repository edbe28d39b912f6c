"""What a trained reward model needs its users to know, stored beside it by `align rm` (`reward_stats.json`).

The condition prompts it was trained with, the per-condition score mean/std (for normalisation), the reward token
(whose hidden state it is scored at) and, for a vision-language model, the `data.images` settings its images were tiled
with. RLHF scoring, the fast path's comparisons and `align bon` read it here, so a model trained with a reward token is
scored at that token everywhere, never with other condition prompts, and its images become the same tiles and tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from align.config import ImagesConfig

INFO_FILE = "reward_stats.json"


@dataclass
class RewardModelInfo:
    conditions: dict[str, str] | None = None
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    reward_token: str | None = None
    images: dict | None = None  # `data.images` as trained (a vision-language model only)

    @classmethod
    def read(cls, model_dir: str | Path) -> RewardModelInfo:
        path = Path(model_dir) / INFO_FILE
        if not path.exists():
            return cls()
        stored = json.loads(path.read_text())
        return cls(stored.get("conditions"), stored.get("stats", {}), stored.get("reward_token"), stored.get("images"))

    def write(self, model_dir: str | Path) -> None:
        payload = {"conditions": self.conditions, "stats": self.stats, "reward_token": self.reward_token}
        if self.images is not None:
            payload["images"] = self.images
        (Path(model_dir) / INFO_FILE).write_text(json.dumps(payload, indent=2))

    def check_conditions(self, conditions: dict[str, str], where: str) -> None:
        if self.conditions and self.conditions != conditions:
            raise ValueError(f"reward.conditions differ from the prompts {where} was trained with "
                             f"({sorted(self.conditions)}); the reward model must see the same condition prompts")  # fmt: skip

    def resolve_reward_token(self, configured: str | None, where: str) -> str | None:
        """The recipe's `reward.reward_token`, else the one the model was trained with; two different ones are an error."""
        if configured is not None and self.reward_token is not None and configured != self.reward_token:
            raise ValueError(f"reward.reward_token is {configured!r} but {where} was trained with {self.reward_token!r}")
        return configured if configured is not None else self.reward_token

    def images_config(self, configured: ImagesConfig) -> ImagesConfig:
        """The image settings the model was trained with (tiling, normalisation), else the recipe's `data.images`."""
        return ImagesConfig(**self.images) if self.images else configured


def reward_token_id(tokenizer: PreTrainedTokenizerBase, token: str | None, setting: str = "reward.reward_token") -> int | None:
    """The id of the reward token, or None when there is none; a token outside the vocabulary is an error naming the setting."""
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{setting} {token!r} is not in the tokenizer's vocabulary")
    return token_id
