"""The fast path's short reward-model update between COOL RLHF rounds (InternLM2 §4.2).

Comparison rows (early vs. late PPO samples where the verifier contradicts the reward, plus any
externally labelled rows from the slow path) train the reward model for a few steps with the same
ranking loss and log barrier as `align rm`. The reward model is a full replica on every rank and
every rank runs the same seeded steps on the same rows, so the replicas stay identical with no
communication.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from align.trainers.rm import collate_pairs
from data_builders.bad_rows import BadRowError, BadRowPolicy
from data_builders.pair_rows import resolve_share_prefix
from data_builders.readers import EmptyDataError, read_jsonl
from rewards.conditions import UnknownConditionError, render_for_reward
from rewards.data import Pair, parse_comparison
from rewards.losses import pair_losses
from rewards.model import pair_scores

if TYPE_CHECKING:
    from align.config import RewardConfig


def comparison_pairs(rows: Sequence[dict] | Mapping[int, dict], tokenizer: PreTrainedTokenizerBase, conditions: dict[str, str], origin: str,
                     policy: BadRowPolicy, max_length: int, reward_token_id: int | None = None) -> list[Pair]:  # fmt: skip
    """Comparison rows → reward-model pairs, rendered exactly as `align rm` renders them; bad rows follow `policy`.

    `rows` is a list (its rows are numbered from 1) or {line number: row} as `read_comparison_files` reads a file.
    """
    pairs = []
    for i, raw in rows.items() if isinstance(rows, Mapping) else enumerate(rows, start=1):
        try:
            prompt, chosen, rejected, condition, margin, tag = parse_comparison(raw, origin, i)
            try:
                ids = [render_for_reward(tokenizer, conditions, condition, prompt, r, reward_token_id) for r in (chosen, rejected)]
            except UnknownConditionError as err:
                raise BadRowError(origin, i, "condition", str(err)) from None
            if max(map(len, ids)) > max_length:
                raise BadRowError(origin, i, "chosen", f"{max(map(len, ids))} tokens exceed max_length {max_length}")
        except BadRowError as err:
            policy.handle(err, raw)
            continue
        pairs.append(Pair(ids[0], ids[1], condition, margin, f"{origin}:{i}", tag))
    return pairs


def read_comparison_files(directory: str | Path, seen: set[str]) -> list[tuple[str, dict[int, dict]]]:
    """New `*.jsonl` files in `directory` (sorted by name), each as (path, {line number: row}); a line that is not UTF-8 or
    not JSON is an error naming its file and line. An empty file has no rows."""
    out = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        if str(path) in seen:
            continue
        try:
            rows = {line: raw for _, line, raw in read_jsonl(path, BadRowPolicy("error"))}
        except EmptyDataError:
            rows = {}
        out.append((str(path), rows))
    return out


@torch.no_grad()
def pairwise_accuracy(model: torch.nn.Module, pairs: list[Pair], pad_id: int, share: bool, batch: int = 32) -> float:
    right, device = 0, next(model.parameters()).device
    for i in range(0, len(pairs), batch):
        chosen, rejected = pair_scores(model, collate_pairs([[p] for p in pairs[i : i + batch]], pad_id, share).rows.to(device))
        right += int((chosen > rejected).sum())
    return right / max(1, len(pairs))


def update_reward_model(model: torch.nn.Module, pairs: list[Pair], pad_id: int, cfg: RewardConfig, steps: int, lr: float,
                        batch_pairs: int, seed: int) -> dict[str, Any]:  # fmt: skip
    """`steps` AdamW steps on `pairs` (seeded order, identical on every rank); returns accuracy on them before and after.

    The weights must be fp32 (they are the master copy): at lr 1e-5, bf16 rounding would swallow most of each update.
    """
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low:
        raise ValueError(f"the fast-path reward-model update needs fp32 master weights, got {low}; load the replica in fp32")
    share = resolve_share_prefix(None, model)
    before = pairwise_accuracy(model, pairs, pad_id, share)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    losses = []
    for _ in range(steps):
        if len(order) < batch_pairs:
            order += torch.randperm(len(pairs), generator=generator, device="cpu").tolist()
        take, order = order[:batch_pairs], order[batch_pairs:]
        batch = collate_pairs([[pairs[i]] for i in take], pad_id, share).rows.to(next(model.parameters()).device)
        chosen, rejected = pair_scores(model, batch)
        loss = pair_losses(cfg.loss, chosen, rejected, None, cfg.gamma, cfg.barrier_weight, cfg.bound).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return {"pairs": len(pairs), "steps": steps, "accuracy_before": before, "accuracy_after": pairwise_accuracy(model, pairs, pad_id, share),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}  # fmt: skip
