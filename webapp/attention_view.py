"""Pictures of recorded attention: where a point of the result looked in the reference
(heatmap overlay, paper Fig. 6) and the reference warped by the attention flow (Fig. 8), with
the clicked point marked on a copy of the result and a colour legend for the heatmap."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from leffa import AttentionRecorder
from leffa.flow import warp_with_flow

LEGEND_SHARE = 12  # the colour legend under a heatmap is 1/12 of its width tall (64 px under 768)
LEGEND_LABELS = ("low", "high")  # the ends of the colour scale: none / the most attention of that point


def layer_groups(recorder: AttentionRecorder) -> dict[str, list[str]]:
    """Recorded layers grouped by token-grid size, finest first: {"128×96": [names]}."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name in recorder.layers():
        groups.setdefault(recorder.grid(name), []).append(name)
    return {f"{h}×{w}": names for (h, w), names in sorted(groups.items(), key=lambda kv: -kv[0][0])}


def colourize(values: np.ndarray) -> np.ndarray:
    """uint8 values (0 = low, 255 = high) as RGB colours of the JET colormap (blue to red)."""
    return cv2.applyColorMap(values, cv2.COLORMAP_JET)[..., ::-1]


def heatmap_overlay(recorder: AttentionRecorder, step: int, layers: list[str], point: tuple[float, float],
                    reference: Image.Image, row: int = 0) -> Image.Image:
    """Mean attention of the query under ``point`` (fractions of width, height) over ``layers``,
    as a JET heatmap blended onto ``reference``; ``row``: the sample's row of the recorded batch."""
    maps = torch.stack([recorder.heatmap(step, name, [point])[row, 0].float() for name in layers]).mean(0)
    maps = maps / maps.max().clamp_min(1e-12)
    w, h = reference.size
    up = F.interpolate(maps[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    colour = colourize((up.clamp(0, 1).numpy() * 255).astype(np.uint8))
    blended = 0.5 * np.asarray(reference.convert("RGB"), np.float32) + 0.5 * colour.astype(np.float32)
    return Image.fromarray(blended.astype(np.uint8))


def with_colour_legend(image: Image.Image) -> Image.Image:
    """``image`` above a strip that shows the heatmap's colour scale, from ``low`` (left) to
    ``high`` (right): the colours of ``colourize``, labelled at both ends."""
    w, h = image.size
    height, margin = max(w // LEGEND_SHARE, 12), w // 8  # the margins hold the labels
    ramp = colourize(np.linspace(0, 255, w - 2 * margin).round().astype(np.uint8)[None])  # (1, n, 3)
    out = Image.new("RGB", (w, h + height), "white")
    out.paste(image.convert("RGB"), (0, 0))
    bar = np.ascontiguousarray(np.repeat(ramp, height // 2, axis=0))
    out.paste(Image.fromarray(bar), (margin, h + height // 4))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default(size=height // 2)
    for x, label in zip((margin // 2, w - margin // 2), LEGEND_LABELS):
        draw.text((x, h + height // 2), label, fill="black", anchor="mm", font=font)
    return out


def mark_point(image: Image.Image, point: tuple[float, float]) -> Image.Image:
    """A copy of ``image`` with a ring and cross-hair at ``point`` (fractions of width, height),
    white on black so that it shows on any colour."""
    marked = image.convert("RGB")  # a new image: the caller's stays unmarked
    w, h = marked.size
    x, y = point[0] * w, point[1] * h
    r = max(min(w, h) // 32, 6)
    draw = ImageDraw.Draw(marked)
    for colour, width in (("black", max(r // 3, 3)), ("white", max(r // 6, 1))):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
        draw.line((x - 2 * r, y, x - r // 2, y), fill=colour, width=width)
        draw.line((x + r // 2, y, x + 2 * r, y), fill=colour, width=width)
        draw.line((x, y - 2 * r, x, y - r // 2), fill=colour, width=width)
        draw.line((x, y + r // 2, x, y + 2 * r), fill=colour, width=width)
    return marked


def warped_reference(recorder: AttentionRecorder, step: int, layers: list[str],
                     reference: Image.Image, row: int = 0) -> Image.Image:
    """``reference`` resampled by the mean attention flow of ``layers``: each output pixel takes
    the colour of where its query looked (``row``: the sample's row of the recorded batch)."""
    flow = torch.stack([recorder.flow(step, name)[row].float() for name in layers]).mean(0)  # (h, w, 2)
    ref = torch.from_numpy(np.asarray(reference.convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]
    warped = warp_with_flow(ref, flow[None])
    return Image.fromarray((warped[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
