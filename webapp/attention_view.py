"""Pictures of recorded attention: where a point of the result looked in the reference
(heatmap overlay, paper Fig. 6) and the reference warped by the attention flow (Fig. 8)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from leffa import AttentionRecorder
from leffa.flow import warp_with_flow


def layer_groups(recorder: AttentionRecorder) -> dict[str, list[str]]:
    """Recorded layers grouped by token-grid size, finest first: {"128×96": [names]}."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name in recorder.layers():
        groups.setdefault(recorder.grid(name), []).append(name)
    return {f"{h}×{w}": names for (h, w), names in sorted(groups.items(), key=lambda kv: -kv[0][0])}


def heatmap_overlay(recorder: AttentionRecorder, step: int, layers: list[str], point: tuple[float, float],
                    reference: Image.Image) -> Image.Image:
    """Mean attention of the query under ``point`` (fractions of width, height) over ``layers``,
    as a JET heatmap blended onto ``reference``."""
    maps = torch.stack([recorder.heatmap(step, name, [point])[0, 0].float() for name in layers]).mean(0)
    maps = maps / maps.max().clamp_min(1e-12)
    w, h = reference.size
    up = F.interpolate(maps[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    colour = cv2.applyColorMap((up.clamp(0, 1).numpy() * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    blended = 0.5 * np.asarray(reference.convert("RGB"), np.float32) + 0.5 * colour.astype(np.float32)
    return Image.fromarray(blended.astype(np.uint8))


def warped_reference(recorder: AttentionRecorder, step: int, layers: list[str],
                     reference: Image.Image) -> Image.Image:
    """``reference`` resampled by the mean attention flow of ``layers``: each output pixel takes
    the colour of where its query looked."""
    flow = torch.stack([recorder.flow(step, name)[0].float() for name in layers]).mean(0)  # (h, w, 2)
    ref = torch.from_numpy(np.asarray(reference.convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]
    warped = warp_with_flow(ref, flow[None])
    return Image.fromarray((warped[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
