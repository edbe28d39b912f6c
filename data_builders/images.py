"""Images of vision-language rows: where an image comes from, how it is checked and opened, and InternVL's tiling.

An image in a row is a path (relative to the data file's directory, or absolute), inline base64 (a `data:` URI or
raw base64), an OpenAI `{"url": ...}` / HF datasets `{"bytes", "path"}` object, raw bytes or a PIL image.
`resolve_image` turns it into an `ImageRef` at build time: the file is decoded once in full there (so a missing,
empty, unreadable or truncated image is a bad row naming file, row and image before training starts), only its size
and tile count are kept, and the pixels are made again when a batch is collated (`ImageRef.pixels`), so a dataset of
many images never sits in memory as float tiles. RGBA, palette (P), CMYK, greyscale images are converted to RGB as
InternVL's loader does (`convert("RGB")`), never rejected.

Tiling is InternVL's `dynamic_preprocess`: tiles of `tile_size` (448) px, grids (i, j) with min ≤ i·j ≤ max,
the grid whose i/j is closest to the image's w/h, ties broken by InternVL's area rule (`closest_grid`, a copy of the
official `find_closest_aspect_ratio` with its candidate order), the image resized to (i·448, j·448) and cropped
row-major, plus a 448×448 thumbnail of the whole image when there is more than one tile. The pixels come from
transformers' `GotOcr2ImageProcessorPil(crop_to_patches=True)` (PIL only: torchvision cannot be imported here), whose
grid choice agrees with the official rule (`tests/test_images.py` compares the two over a grid of sizes and tile limits, and the
pixels against an official-style PIL pipeline); ImageNet mean/std as InternVL trains.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from data_builders.bad_rows import BadRowError
from data_builders.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BASE64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")


@dataclass(frozen=True)
class ImageConfig:
    """How images become tiles and tokens (InternVL's defaults); the recipe's `data.images` section.

    `tokens_per_tile` is what the vision side yields per tile: (448/14)² × 0.5² = 256 after InternVL's pixel shuffle.
    Tests use tiny tiles (28 px, 4 tokens) so a whole image row is a few dozen tokens.
    """

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    tokens_per_tile: int = 256
    start_token: str | None = "<img>"
    context_token: str = "<IMG_CONTEXT>"  # the positions that get vision embeddings
    end_token: str | None = "</img>"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every inconsistent setting, as align/config.py's sections report them."""
        out = []
        for name in ("tile_size", "min_tiles", "max_tiles", "tokens_per_tile"):
            if getattr(self, name) < 1:
                out.append((name, f"must be at least 1, got {getattr(self, name)}"))
        if self.min_tiles > self.max_tiles:
            out.append(("min_tiles", f"must not exceed max_tiles ({self.max_tiles}), got {self.min_tiles}"))
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            out.append(("std", "mean and std need three values each, std positive"))
        return out

    def check(self) -> ImageConfig:
        problems = self.problems()
        if problems:
            raise UserError("data.images: " + "; ".join(f"{k}: {v}" for k, v in problems))
        return self


def image_config_for(model_config: Any, base: ImageConfig | None = None, tokenizer: Any = None) -> ImageConfig:
    """`base` with what a loaded InternVL-style model fixes: tile side (`vision_config.image_size`), tokens per tile
    (`image_seq_length`) and, when the tokenizer names them (InternVL `-hf` tokenizers do), the three image tokens."""
    base = base or ImageConfig()
    vision = getattr(model_config, "vision_config", None)
    size = getattr(vision, "image_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    changes: dict[str, Any] = {}
    if isinstance(size, int):
        changes["tile_size"] = size
    if isinstance(getattr(model_config, "image_seq_length", None), int):
        changes["tokens_per_tile"] = model_config.image_seq_length
    for name, attr in (("start_token", "start_image_token"), ("context_token", "context_image_token"), ("end_token", "end_image_token")):
        if isinstance(getattr(tokenizer, attr, None), str):
            changes[name] = getattr(tokenizer, attr)
    return dataclasses.replace(base, **changes)


class ImageHandler(Protocol):
    """What the data path needs from a model's image side: tiles and tokens for an image size, and its pixel tensor.

    `InternVLImages` is the built-in one; another model plugs in its own (e.g. a count its processor defines).
    """

    def tiles(self, width: int, height: int) -> int: ...

    def num_tokens(self, width: int, height: int) -> int: ...

    def pixels(self, image: Image.Image) -> torch.Tensor: ...


def target_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """InternVL's candidate grids (columns, rows), in its own order: a set of (i, j), sorted by i·j (stable)."""
    grids = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles}  # fmt: skip
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448) -> tuple[int, int]:
    """(columns, rows) by InternVL's `find_closest_aspect_ratio`: the closest i/j to w/h; on an exact tie a later (larger)
    grid wins only while the image area exceeds half of the grid's pixel area (`area > 0.5·tile²·i·j`)."""
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in target_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid
    return best


@dataclass
class InternVLImages:
    """InternVL's dynamic tiling and token count: `tokens_per_tile` × tiles context tokens per image."""

    config: ImageConfig = field(default_factory=ImageConfig)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        c = self.config
        return closest_grid(width, height, c.min_tiles, c.max_tiles, c.tile_size)

    def tiles(self, width: int, height: int) -> int:
        cols, rows = self.grid(width, height)
        return cols * rows + int(self.config.thumbnail and cols * rows > 1)

    def num_tokens(self, width: int, height: int) -> int:
        return self.config.tokens_per_tile * self.tiles(width, height)

    @cached_property
    def processor(self) -> Any:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        c = self.config
        return GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=c.min_tiles, max_patches=c.max_tiles,
                                        size={"height": c.tile_size, "width": c.tile_size},
                                        image_mean=list(c.mean), image_std=list(c.std))  # fmt: skip

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(tiles, 3, tile, tile) float32: the grid's crops row-major, then the thumbnail when there is more than one."""
        import torch

        c = self.config
        cols, rows = self.grid(*image.size)
        if c.thumbnail or cols * rows == 1:
            out = self.processor(images=[image], return_tensors="pt")
            values, count = out["pixel_values"], int(out["num_patches"][0])
        else:  # no thumbnail: crop with the processor's own routine, then normalise
            values, count = self._crops_without_thumbnail(image), cols * rows
        expected = self.tiles(*image.size)
        if count != expected or values.shape[0] != expected:  # our bug, not the user's: the two rules disagree
            raise RuntimeError(f"transformers' tiling gave {count} tiles for a {image.size} image, InternVL's rule {expected}")
        return values.to(dtype=torch.float32)

    def _crops_without_thumbnail(self, image: Image.Image) -> torch.Tensor:
        import numpy as np
        import torch
        from transformers.image_utils import SizeDict

        c, proc = self.config, self.processor
        array = np.asarray(image).transpose(2, 0, 1)
        crops = proc.crop_image_to_patches(array, c.min_tiles, c.max_tiles, use_thumbnail=False,
                                           patch_size=SizeDict(height=c.tile_size, width=c.tile_size), resample=proc.resample)  # fmt: skip
        tiles = [proc.normalize(proc.rescale(t, proc.rescale_factor), list(c.mean), list(c.std)) for t in crops]
        return torch.from_numpy(np.stack(tiles)).float()


@dataclass
class ImageRef:
    """One checked image of a row: where it is, how it is named in messages, its size and token count."""

    source: Any  # a resolved Path, bytes, or a PIL image
    label: str  # the path as the row gave it, or "inline base64 (N bytes)"
    width: int
    height: int
    tiles: int
    tokens: int
    handler: ImageHandler = field(repr=False)

    def open(self) -> Image.Image:
        return _decode(self.source)

    def pixels(self) -> torch.Tensor:
        """The tiles, made now (at collate time), from the source."""
        return self.handler.pixels(self.open())


def base_dir_of(origin: str) -> Path:
    """Where relative image paths of rows from `origin` start: a data file's directory, a dataset directory, else here."""
    p = Path(origin)
    if p.is_file():
        return p.parent
    return p if p.is_dir() else Path.cwd()


def is_raw_base64(value: str) -> bool:
    """A long string of base64 characters only: inline image data, not a path."""
    return len(value) >= 64 and _BASE64.match(value) is not None


def _inline_bytes(value: str) -> bytes | None:
    """The bytes of a `data:` URI or raw base64 string, else None (a path)."""
    if value.startswith("data:"):
        head, sep, body = value.partition(",")
        if not sep or ";base64" not in head:
            raise ValueError("a data: URI without ';base64,' (only base64 data URIs are supported)")
        try:
            return base64.b64decode(body, validate=False)
        except binascii.Error as err:
            raise ValueError(f"its base64 does not decode ({err})") from None
    if is_raw_base64(value):
        try:
            return base64.b64decode(value, validate=False)
        except binascii.Error:
            return None
    return None


def _source(value: Any, base_dir: Path) -> tuple[Any, str]:
    """(a Path, bytes or PIL image, a label for messages) of one image value."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value, "an in-memory image"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), f"inline bytes ({len(value)} bytes)"
    if isinstance(value, dict):  # OpenAI {"url": ...}, HF datasets {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _source(value["bytes"], base_dir)
        for key in ("url", "path", "image"):
            if isinstance(value.get(key), str):
                return _source(value[key], base_dir)
        raise ValueError(f"an image object needs 'url', 'path' or 'bytes', got keys {sorted(value)}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a path, base64 string or image object, got {type(value).__name__} {value!r:.40}")
    data = _inline_bytes(value)
    if data is not None:
        return data, f"inline base64 ({len(data)} bytes)"
    if value.startswith(("http://", "https://")):
        raise ValueError(f"{value!r} is a URL; align reads images from disk or inline base64 (download it first)")
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base_dir / path), repr(value)


def _decode(source: Any) -> Image.Image:
    """Open and fully decode (so truncated data fails here), converted to RGB."""
    from PIL import Image

    image = source if isinstance(source, Image.Image) else Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def open_checked(source: Any, label: str) -> Image.Image:
    """The RGB image, or a ValueError saying in plain words what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Path):
        if not source.exists():
            raise ValueError(f"{label}: file not found ({source})")
        if not source.is_file():
            raise ValueError(f"{label}: not a file ({source})")
        if source.stat().st_size == 0:
            raise ValueError(f"{label}: empty file, 0 bytes ({source})")
    elif isinstance(source, bytes) and not source:
        raise ValueError(f"{label}: empty, 0 bytes")
    where = f" ({source})" if isinstance(source, Path) else ""
    from PIL import ImageFile

    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False  # a library may have turned it on
    try:
        image = _decode(source)
    except UnidentifiedImageError:
        raise ValueError(f"{label}: not an image PIL can read{where}") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # truncated / corrupt data
        raise ValueError(f"{label}: truncated or corrupt image data{where}: {err}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{label}: zero-size image ({image.width}x{image.height}){where}")
    return image


def resolve_image(value: Any, handler: ImageHandler, origin: str, row: int, index: int, base_dir: Path | None = None,
                  field_name: str = "images") -> ImageRef:  # fmt: skip
    """Check image `index` (0-based) of a row; a bad one is a BadRowError naming file, row and image (1-based)."""
    where = f"{field_name}[{index}]"
    try:
        source, label = _source(value, base_dir if base_dir is not None else base_dir_of(origin))
        image = open_checked(source, f"image {index + 1} {label}")
    except ValueError as err:
        message = str(err) if str(err).startswith("image ") else f"image {index + 1}: {err}"
        raise BadRowError(origin, row, where, message) from None
    w, h = image.size
    return ImageRef(source, label, w, h, handler.tiles(w, h), handler.num_tokens(w, h), handler)
