"""Where the synthetic math comparisons' signal lives in an SFT checkpoint, and why a reward model misses it.

A diagnostic, not a benchmark: it explains `align rm`'s per-tag accuracy on the synthetic task
(issue 3's efficacy target). For the held-out `final_answer_off_by_1` pairs (same worked steps, the
final answer's units digit off by one) it prints:

1. the SFT model's own verdict: is log p(chosen) > log p(rejected)? (the LM predicts every digit);
2. a linear probe on the hidden state at the token the reward model scores (`<|im_end|>`) and at the
   last digit, every layer: what a scalar head on that checkpoint can read without new circuits;
3. an MLP probe on [top hidden state before the last digit, embedding of the last digit], trained
   with mini-batches of 24: the comparison itself, once both operands sit side by side.

`python benchmarks/rm_capacity_probe.py [--model runs/sft-quickstart/model]` (about a minute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_builders.synthetic import SyntheticTask  # noqa: E402
from rewards.conditions import DEFAULT_CONDITIONS, render_for_reward  # noqa: E402

TAG = "final_answer_off_by_1"


def encode(tokenizer, row: dict, response: str) -> list[int]:
    return render_for_reward(tokenizer, DEFAULT_CONDITIONS, row["condition"], row["prompt"], response)


@torch.no_grad()
def features(model, tokenizer, rows: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """Probe features per (layer, position), labels (1 = chosen) and the LM's own pairwise accuracy."""
    feats: dict[str, list[torch.Tensor]] = {}
    labels, lm_right = [], 0
    embed = model.get_input_embeddings().weight
    for row in rows:
        logps = []
        for response, label in ((row["chosen"], 1.0), (row["rejected"], 0.0)):
            ids = encode(tokenizer, row, response)
            out = model(torch.tensor([ids]), output_hidden_states=True)
            logits = out.logits[0, :-1].log_softmax(-1)
            logps.append(logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item())
            for layer, hidden in enumerate(out.hidden_states):
                feats.setdefault(f"layer {layer} <|im_end|>", []).append(hidden[0, -1])
                feats.setdefault(f"layer {layer} last digit", []).append(hidden[0, -2])
            feats.setdefault("pair [h(before last digit), E(last digit)]", []).append(torch.cat([out.hidden_states[-1][0, -3], embed[ids[-2]]]))
            labels.append(label)
        lm_right += logps[0] > logps[1]
    return {k: torch.stack(v) for k, v in feats.items()}, torch.tensor(labels), lm_right / len(rows)


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, hidden: int, steps: int) -> float:
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    a, b = (train_x - mean) / std, (test_x - mean) / std
    width = a.shape[1]
    net = torch.nn.Linear(width, 1) if not hidden else torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(train_y), (24,))
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(a[idx]).squeeze(-1), train_y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return ((net(b).squeeze(-1) > 0).float() == test_y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/sft-quickstart/model")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    task = SyntheticTask(seed=args.seed, digits=2)
    pick = lambda rows: [r for r in rows if r["tag"] == TAG]  # noqa: E731
    train_x, train_y, _ = features(model, tokenizer, pick(task.preference_pairs(6000, "train")))
    test_x, test_y, lm_accuracy = features(model, tokenizer, pick(task.preference_pairs(1200, "heldout")))
    print(f"{TAG}: {len(train_y) // 2} train pairs, {len(test_y) // 2} held-out pairs")
    print(f"SFT log p(chosen) > log p(rejected): {lm_accuracy:.1%}")
    for name in train_x:
        hidden, steps = (256, 100) if name.startswith("pair") else (0, 500)
        kind = f"MLP probe, {steps} steps" if hidden else f"linear probe, {steps} steps"
        print(f"{name:48s} {kind:24s} held-out accuracy {probe(train_x[name], train_y, test_x[name], test_y, hidden, steps):.1%}")


if __name__ == "__main__":
    main()
