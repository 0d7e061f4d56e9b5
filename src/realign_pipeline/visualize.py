"""Pillow drawing helpers: layouts over images, attention heatmaps, before/after attention grids.

Only Pillow and numpy (no matplotlib). Every function returns a new RGB :class:`PIL.Image.Image` and leaves its
inputs alone. Text uses Pillow's default font (``ImageFont.load_default()``).

* :func:`overlay_layout` -- a layout's regions (masks or boxes) in distinct colors, labeled with phrase and score.
* :func:`heatmap` -- a colormap applied to a normalized 2-D map, resized to an image size.
* :func:`attention_grid` -- one labeled row per word: its attention map before and after (and their difference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .layout import Layout, Region

__all__ = [
    "PALETTE",
    "attention_grid",
    "colorize",
    "display_size",
    "figure6_panel",
    "figure7_maps",
    "heatmap",
    "overlay_layout",
    "region_box",
    "titled",
]

Box = tuple[float, float, float, float]
Color = tuple[int, int, int]

#: Distinct region colors (Okabe-Ito, readable by color-blind viewers), cycled for more regions.
PALETTE: tuple[Color, ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)

# Anchor colors of two colormaps, linearly interpolated: viridis (sequential, for attention) and a
# blue-white-red diverging map (for differences, 0 is white).
_COLORMAPS: dict[str, np.ndarray] = {
    "viridis": np.array(
        [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
         [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]],
        dtype=np.float64,
    ),
    "diverging": np.array(
        [[33, 102, 172], [103, 169, 207], [209, 229, 240], [247, 247, 247], [253, 219, 199],
         [239, 138, 98], [178, 24, 43]],
        dtype=np.float64,
    ),
}

_BACKGROUND: Color = (255, 255, 255)
_TEXT: Color = (20, 20, 20)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _as_array(map_2d: Any) -> np.ndarray:
    if isinstance(map_2d, torch.Tensor):
        map_2d = map_2d.detach().float().cpu().numpy()
    array = np.asarray(map_2d, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {array.shape}")
    return array


def _text_size(draw: ImageDraw.ImageDraw, text: str) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=_font())
    return x1 - x0, y1 - y0


def display_size(size: tuple[int, int], min_side: int = 256) -> tuple[int, int]:
    """`size` (width, height) scaled up by a whole factor so the shorter side is at least `min_side`.

    Small images (the tiny demo draws 64x64) are enlarged before drawing so that labels stay readable.
    """
    width, height = size
    factor = max(1, -(-min_side // max(1, min(width, height))))
    return width * factor, height * factor


def colorize(values: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] (clipped) to uint8 RGB with one of ``"viridis"`` or ``"diverging"``."""
    try:
        anchors = _COLORMAPS[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}; choose one of {sorted(_COLORMAPS)}") from None
    position = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    rgb = anchors[low] * (1 - frac) + anchors[low + 1] * frac
    return np.round(rgb).astype(np.uint8)


def heatmap(
    map_2d: Any,
    size: tuple[int, int],
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> Image.Image:
    """A 2-D map (tensor or array) normalized to [0, 1], resized to `size` (width, height), then colored.

    `vmin`/`vmax` default to the map's own minimum and maximum; pass shared values to compare maps. A
    constant map comes out as the colormap's lowest color.
    """
    array = _as_array(map_2d)
    low = float(array.min()) if vmin is None else float(vmin)
    high = float(array.max()) if vmax is None else float(vmax)
    span = high - low
    normalized = (array - low) / span if span > 0 else np.zeros_like(array)
    resized = Image.fromarray(normalized.astype(np.float32), mode="F").resize(size, resample)
    return Image.fromarray(colorize(np.asarray(resized), cmap), mode="RGB")


def region_box(region: Region, threshold: float = 0.5) -> Box | None:
    """The region's box in image fractions: its `box`, or the bounding box of its mask above `threshold`."""
    if region.box is not None:
        return tuple(region.box)  # type: ignore[return-value]
    mask = region.mask.numpy() if isinstance(region.mask, torch.Tensor) else np.asarray(region.mask)
    rows, cols = np.nonzero(mask > threshold)
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height)


def _coverage(region: Region, height: int, width: int) -> np.ndarray:
    """The region's mask on a (height, width) pixel grid: nearest-neighbour when enlarging a mask (crisp edges),
    the layout's own area-keeping resize when shrinking it, exact box coverage for boxes."""
    mask = region.mask
    if mask is not None and mask.shape[0] <= height and mask.shape[1] <= width:
        rows = np.arange(height) * mask.shape[0] // height
        cols = np.arange(width) * mask.shape[1] // width
        return mask.numpy().astype(np.float64)[rows[:, None], cols[None, :]]
    return region.mask_at(height, width).numpy().astype(np.float64)


def _pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    x0, y0, x1, y1 = box
    return (round(x0 * width), round(y0 * height), max(round(x1 * width) - 1, 0), max(round(y1 * height) - 1, 0))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, color: Color, bounds: tuple[int, int]) -> None:
    """Text on a filled tag of `color`, kept inside an image of size `bounds`."""
    text_w, text_h = _text_size(draw, text)
    x = min(max(xy[0], 0), max(bounds[0] - text_w - 4, 0))
    y = min(max(xy[1], 0), max(bounds[1] - text_h - 6, 0))
    draw.rectangle((x, y, x + text_w + 4, y + text_h + 5), fill=color)
    dark = sum(color) > 3 * 140
    draw.text((x + 2, y + 1), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=_font())


def overlay_layout(
    image: Image.Image,
    layout: Layout | Sequence[Region],
    alpha: float = 0.35,
    outline_width: int = 2,
    min_side: int = 256,
    colors: Sequence[Color] = PALETTE,
) -> Image.Image:
    """Draw each region of `layout` over `image`: its mask (or box) tinted, its box outlined, ``phrase (s=...)``.

    The image is first enlarged (nearest neighbour, see :func:`display_size`) so that its shorter side is at
    least `min_side` pixels; pass ``min_side=0`` to draw at the image's own size.
    """
    size = display_size(image.size, min_side) if min_side else image.size
    base = image.convert("RGB").resize(size, Image.Resampling.NEAREST)
    width, height = size
    canvas = np.asarray(base, dtype=np.float64).copy()
    regions = list(layout)
    for index, region in enumerate(regions):
        coverage = _coverage(region, height, width)[..., None]
        color = np.array(colors[index % len(colors)], dtype=np.float64)
        canvas = canvas * (1 - alpha * coverage) + color * (alpha * coverage)
    result = Image.fromarray(np.round(canvas).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(result)
    for index, region in enumerate(regions):
        box = region_box(region)
        if box is None:
            continue
        color = colors[index % len(colors)]
        pixels = _pixel_box(box, size)
        draw.rectangle(pixels, outline=color, width=outline_width)
        _label(draw, (pixels[0] + outline_width, pixels[1] + outline_width), f"{region.phrase} (s={region.score:g})",
               color, size)
    return result


def _outline(image: Image.Image, box: Box | None, color: Color, width: int = 2) -> Image.Image:
    if box is not None:
        ImageDraw.Draw(image).rectangle(_pixel_box(box, image.size), outline=color, width=width)
    return image


def attention_grid(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    words: Sequence[str],
    image_size: tuple[int, int] | int,
    titles: tuple[str, str] = ("plain", "realigned"),
    show_difference: bool = True,
    boxes: Mapping[str, tuple[Box | None, Color]] | None = None,
    label_width: int = 110,
    padding: int = 6,
) -> Image.Image:
    """One image: a header, then per word a row ``label | before | after | after - before``.

    Args:
        before, after: word -> 2-D attention map (as in ``RealignDiffPipelineOutput.attention_maps[i]``).
        words: the rows, in order; each must be a key of both dicts.
        image_size: size of each map cell, (width, height) or one int for squares.
        titles: the column titles of `before` and `after`.
        show_difference: add a column with ``after - before`` (blue less, red more, white unchanged), scaled to
            the row's largest absolute change.
        boxes: optional word -> (box in image fractions, color), outlined on the word's cells (its region).
        label_width, padding: layout of the grid in pixels.

    Each row shares one color scale between `before` and `after` (the row's minimum to maximum over both maps,
    printed under the word), so the two cells can be compared directly.
    """
    missing = [word for word in words if word not in before or word not in after]
    if missing:
        raise KeyError(f"no attention map for {missing}; available: {sorted(set(before) & set(after))}")
    cell = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    headers = [*titles] + (["after - before"] if show_difference else [])
    columns = len(headers)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag")[1] + 4
    header_h = line_h + padding
    width = label_width + columns * (cell[0] + padding) + padding
    height = header_h + len(words) * (cell[1] + padding) + padding
    grid = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(headers):
        draw.text((label_width + column * (cell[0] + padding), padding // 2), title, fill=_TEXT, font=_font())
    for row, word in enumerate(words):
        first, second = _as_array(before[word]), _as_array(after[word])
        low, high = min(first.min(), second.min()), max(first.max(), second.max())
        top = header_h + row * (cell[1] + padding)
        cells = [heatmap(first, cell, low, high), heatmap(second, cell, low, high)]
        if show_difference:
            change = second - first
            limit = float(np.abs(change).max()) or 1.0
            cells.append(heatmap(change, cell, -limit, limit, cmap="diverging"))
        box, color = (boxes or {}).get(word, (None, _TEXT))
        for column, image in enumerate(cells):
            grid.paste(_outline(image, box, color), (label_width + column * (cell[0] + padding), top))
        draw.text((padding, top), word, fill=_TEXT, font=_font())
        draw.text((padding, top + line_h), f"min {low:.4g}", fill=_TEXT, font=_font())
        draw.text((padding, top + 2 * line_h), f"max {high:.4g}", fill=_TEXT, font=_font())
        if show_difference:
            draw.text((padding, top + 3 * line_h), f"diff +/-{limit:.2g}", fill=_TEXT, font=_font())
    return grid


def titled(image: Image.Image, title: str, padding: int = 6) -> Image.Image:
    """`image` under a one-line title on a white strip."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = _text_size(probe, "Ag")[1] + padding
    canvas = Image.new("RGB", (image.width, image.height + title_h), _BACKGROUND)
    ImageDraw.Draw(canvas).text((2, padding // 2 - 1), title, fill=_TEXT, font=_font())
    canvas.paste(image.convert("RGB"), (0, title_h))
    return canvas


def figure6_panel(
    coarse: Image.Image,
    layout_regions: Layout | Sequence[Region],
    final: Image.Image,
    min_side: int = 256,
    padding: int = 6,
    titles: tuple[str, str, str] = ("coarse", "dense caption (phrase, score)", "re-aligned"),
) -> Image.Image:
    """The paper's Figure 6 as one picture: ``coarse image | layout masks over it | final image``.

    The middle panel is :func:`overlay_layout` of `layout_regions` (a ``Layout``, a ``ResolvedLayout.regions``
    list or any regions) over the coarse image, each region labeled with its phrase and score. All three are
    enlarged alike (nearest neighbour, :func:`display_size`) so that the shorter side is at least `min_side`.
    """
    size = display_size(coarse.size, min_side) if min_side else coarse.size
    cells = [
        coarse.convert("RGB").resize(size, Image.Resampling.NEAREST),
        overlay_layout(coarse, list(layout_regions), min_side=0 if size == coarse.size else min_side).resize(size),
        final.convert("RGB").resize(size, Image.Resampling.NEAREST),
    ]
    cells = [titled(cell, title, padding) for cell, title in zip(cells, titles)]
    width = sum(cell.width for cell in cells) + padding * (len(cells) + 1)
    height = max(cell.height for cell in cells) + 2 * padding
    panel = Image.new("RGB", (width, height), _BACKGROUND)
    x = padding
    for cell in cells:
        panel.paste(cell, (x, padding))
        x += cell.width + padding
    return panel


def figure7_maps(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    words: Sequence[str],
    image_size: tuple[int, int] | int,
    titles: tuple[str, str] = ("before re-alignment", "after re-alignment"),
    boxes: Mapping[str, tuple[Box | None, Color]] | None = None,
) -> Image.Image:
    """The paper's Figure 7: per word, its cross-attention map before and after re-alignment side by side
    (and their difference), on one color scale per word. A thin wrapper of :func:`attention_grid`."""
    if not words:
        raise ValueError("figure7_maps needs at least one word")
    return attention_grid(before, after, list(words), image_size, titles=titles, boxes=boxes)
