"""A seeded, verifiable visual task for the image path: shapes drawn with PIL, questions about what is drawn.

Three conditions, one question each about the same kind of picture (shapes of one colour on a light background,
kinds and positions at random):
- ``colour``: "What colour is the shape?" (6 colours);
- ``size``: "Is the shape big or small?" (a side of a half to two thirds of the picture's height, or a fifth to a quarter);
- ``count``: "How many squares are there?" (1-3 squares of one size).

What is asked is what a tiny vision tower sees in a quickstart's budget: builtin:vlm-tiny (a one-layer ViT, 4 tokens per
56-pixel tile, a 2-layer language model) learns colour, covered area and so size and number, but not which kind of shape
is drawn or where it sits (measured: both stayed at chance after 800 SFT steps, so neither is asked).

Every answer is `Final Answer: ...` alone, checked by `rewards.verifiers.task_score` (text case-insensitively, counts as
numbers): with a description before it, the policy's samples pair a right answer with a wrong description, and MPO
then trains the two apart. A quarter of the pictures are twice as wide as high, so dynamic tiling makes several tiles
and a thumbnail of them. Images are inline base64 PNG
data URIs: rows stay JSON (sampled pairs are saved and read back) and need no files. A picture is held out by a hash
of everything that draws it, so no held-out image is also a training image; `problems` checks that by construction.

The task is the image counterpart of `data_builders/synthetic.py` with the same views (SFT conversations, preference
pairs, prompts with ground truth), so every trainer takes it through `data.synthetic.task: visual`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
    "yellow": (225, 195, 30), "purple": (135, 55, 175), "orange": (240, 130, 20),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
CONDITIONS = ("colour", "size", "count")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "size": "Is the shape big or small?",
    "count": "How many squares are there?",
}
MAX_COUNT = 3
HELDOUT_EVERY = 8


@dataclass(frozen=True)
class Picture:
    """Everything that draws one image: its size, background, and each shape's box (left, top, side)."""

    width: int
    height: int
    background: int
    shape: str
    colour: str
    boxes: tuple[tuple[int, int, int], ...]

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}/{self.background}/{self.shape}/{self.colour}/{self.boxes}"

    def draw(self) -> bytes:
        """The PNG bytes of the picture."""
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (self.width, self.height), (self.background,) * 3)
        pen = ImageDraw.Draw(image)
        fill = COLOURS[self.colour]
        for left, top, side in self.boxes:
            box = (left, top, left + side - 1, top + side - 1)
            if self.shape == "circle":
                pen.ellipse(box, fill=fill)
            elif self.shape == "square":
                pen.rectangle(box, fill=fill)
            else:
                pen.polygon([(left + side / 2, top), (left, top + side - 1), (left + side - 1, top + side - 1)], fill=fill)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.draw()).decode("ascii")

    @property
    def size(self) -> str:
        return "big" if 2 * self.boxes[0][2] >= self.height else "small"


def answer_of(picture: Picture, condition: str) -> str | int:
    return {"colour": picture.colour, "size": picture.size, "count": len(picture.boxes)}[condition]


def response_for(picture: Picture, condition: str) -> str:
    return f"Final Answer: {answer_of(picture, condition)}"


def is_heldout(key: str) -> bool:
    return hashlib.sha1(key.encode()).digest()[0] % HELDOUT_EVERY == 0


@dataclass(frozen=True)
class VisualProblem:
    uid: str
    condition: str
    picture: Picture

    @property
    def answer(self) -> str | int:
        return answer_of(self.picture, self.condition)

    def messages(self) -> list[dict]:
        """One user turn: the image, then the question (InternVL's `<image>\\nquestion` order)."""
        parts = [{"type": "image", "image": self.picture.data_uri()}, {"type": "text", "text": "\n" + QUESTIONS[self.condition]}]
        return [{"role": "user", "content": parts}]

    def as_row(self) -> dict:
        return {"uid": self.uid, "condition": self.condition, "messages": self.messages(), "answer": self.answer, "unsafe": False}


class VisualTask:
    """Seeded generator of picture problems, SFT conversations, preference pairs and prompts with ground truth."""

    def __init__(self, seed: int = 0, tile_size: int = 56, wide_share: float = 0.25):
        self.seed, self.tile_size, self.wide_share = seed, tile_size, wide_share

    def picture(self, rng: random.Random, condition: str) -> Picture:
        height = self.tile_size
        width = 2 * height if rng.random() < self.wide_share else height
        if condition == "count":  # squares of one side: the covered area grows with the number
            count, kind, sides = rng.randint(1, MAX_COUNT), "square", (height // 4, height // 4)
        else:
            count, kind = 1, rng.choice(SHAPES)
            sides = (height // 2, (2 * height) // 3) if rng.random() < 0.5 else (height // 5, height // 4)
        boxes: list[tuple[int, int, int]] = []
        while len(boxes) < count:  # shapes never overlap (a count must be visible)
            side = rng.randint(*sides)
            box = (rng.randint(0, width - side), rng.randint(0, height - side), side)
            if all(box[0] + box[2] < b[0] or b[0] + b[2] < box[0] or box[1] + box[2] < b[1] or b[1] + b[2] < box[1] for b in boxes):
                boxes.append(box)
        return Picture(width, height, rng.randint(225, 255), kind, rng.choice(sorted(COLOURS)), tuple(boxes))

    def problems(self, n: int, split: str = "train", salt: str = "") -> list[VisualProblem]:
        """`n` problems cycling through the conditions; a picture falls in `split` ('train' or 'heldout') by its hash."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        rng = random.Random(f"visual/{self.seed}/{split}/{salt}")
        out: list[VisualProblem] = []
        while len(out) < n:
            condition = CONDITIONS[len(out) % len(CONDITIONS)]
            picture = self.picture(rng, condition)
            if is_heldout(picture.key) == (split == "heldout"):
                out.append(VisualProblem(f"{condition}/{picture.key}", condition, picture))
        return out

    def sft_conversations(self, n: int, split: str = "train") -> list[dict]:
        return [{"messages": [*p.messages(), {"role": "assistant", "content": response_for(p.picture, p.condition)}],
                 "condition": p.condition} for p in self.problems(n, split, salt="sft")]  # fmt: skip

    def preference_pairs(self, n: int, split: str = "train") -> list[dict]:
        """The right answer against another one."""
        rng = random.Random(f"visual/{self.seed}/pairs/{split}")
        rows = []
        for p in self.problems(n, split, salt="pairs"):
            rows.append({"prompt": p.messages(), "chosen": response_for(p.picture, p.condition),
                         "rejected": f"Final Answer: {wrong_answer(rng, p.picture, p.condition)}", "condition": p.condition,
                         "tag": f"wrong_{p.condition}"})  # fmt: skip
        return rows

    def rl_prompts(self, n: int, split: str = "train") -> list[dict]:
        return [p.as_row() for p in self.problems(n, split, salt="rl")]


def wrong_answer(rng: random.Random, picture: Picture, condition: str) -> str | int:
    """Another answer to the same question (what a wrong response would say)."""
    options = {"colour": sorted(COLOURS), "size": ["big", "small"], "count": list(range(1, MAX_COUNT + 1))}[condition]
    return rng.choice([a for a in options if a != answer_of(picture, condition)])
