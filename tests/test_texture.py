"""MCLD's texture map (``preprocess.texture``): where photo pixels land in the part tiles (by hand),
the tiles' layout in the region atlas, the atlas -> SMPL UV mapping against UVTextureConverter's
own ``Atlas2Normal.convert``, absent parts, colour order and clear errors. Parity with MCLD's
script itself: ``benchmarks/parity_face_texture.py``."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from errors import UserError
from preprocess.texture import (
    NUM_PARTS,
    TILE,
    TextureInputError,
    part_regions,
    part_tiles,
    texture_gather,
    texture_map,
)


def scene(h: int = 64, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((h, w, 3), np.uint8), np.zeros((h, w, 3), np.uint8)


def _region_file(path):
    """A stand-in for MCLD's region image (fetched, never shipped): 6 rows × 4 columns of 200×200
    tiles, tile k holding a disc whose radius grows with k, so each part's region is its own."""
    yy, xx = np.mgrid[:TILE, :TILE]
    grey = np.zeros((6 * TILE, 4 * TILE), np.uint8)
    for k in range(NUM_PARTS):
        row, col = k % 6, k // 6
        grey[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE] = 255 * (
            (yy - 100) ** 2 + (xx - 100) ** 2 < (40 + 2 * k) ** 2)
    Image.fromarray(grey).save(path)
    return grey


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    path = tmp_path_factory.mktemp("regions") / "texture_bg_200.png"
    _region_file(path)
    return part_regions(path)


def test_the_region_file_s_tiles_go_down_the_columns(tmp_path):
    grey = _region_file(tmp_path / "bg.png")  # (1200, 800): 6 rows × 4 columns of tiles
    regions = part_regions(tmp_path / "bg.png")
    assert regions.shape == (NUM_PARTS, TILE, TILE) and regions.dtype == bool
    assert (regions[0] == (grey[:200, :200] > 0)).all()  # part 1: top left
    assert (regions[1] == (grey[200:400, :200] > 0)).all()  # part 2: below it
    assert (regions[6] == (grey[:200, 200:400] > 0)).all()  # part 7: top of the second column
    assert (regions[23] == (grey[1000:, 600:] > 0)).all()  # part 24: bottom right
    assert len({int(r.sum()) for r in regions}) == NUM_PARTS


def test_a_damaged_region_file_is_named(tmp_path):
    (tmp_path / "bg.png").write_bytes(b"not a png")
    with pytest.raises(TextureInputError, match="bg.png is not MCLD's texture region image"):
        part_regions(tmp_path / "bg.png")
    Image.new("L", (800, 1000)).save(tmp_path / "small.png")
    with pytest.raises(TextureInputError, match="small.png is not MCLD's texture region image"):
        part_regions(tmp_path / "small.png")


@pytest.mark.parametrize("u, v, row, col", [
    (0, 255, 0, 0),  # V = 1 is the top row
    (255, 0, 199, 199),
    (128, 64, 149, 99),  # ⌊191·199/255⌋ = ⌊149.05⌋, ⌊128·199/255⌋ = ⌊99.89⌋
])
def test_a_pixel_lands_at_its_uv_in_its_part_s_tile(u, v, row, col, regions):
    photo, iuv = scene()
    photo[10, 20] = (255, 90, 7)
    iuv[10, 20] = (5, u, v)
    tiles = part_tiles(photo, iuv, regions)
    assert (tiles[4, row, col] == (255, 90, 7)).all()
    others = np.delete(tiles, 4, axis=0)
    assert not others.any()
    # kept: at most the 10×10 dilation of the filled pixel (OpenCV's anchor (5, 5): 4 before, 5 after)
    window = np.zeros((TILE, TILE), bool)
    window[max(row - 4, 0):row + 6, max(col - 4, 0):col + 6] = True
    assert not tiles[4][~window].any()


def test_holes_inside_the_region_are_inpainted_and_the_rest_stays_black(regions):
    photo, iuv = scene(200, 200)
    photo[:] = (200, 120, 40)
    iuv[..., 0] = 2
    yy, xx = np.mgrid[:200, :200]
    iuv[..., 1] = np.ceil(xx // 8 * 8 * 255 / 199)  # U of tile column 8·⌊x/8⌋: every 8th column filled
    iuv[..., 2] = 255 - np.ceil(yy * 255 / 199)  # V of tile row y: every row
    tile = part_tiles(photo, iuv, regions)[1]
    region = regions[1]
    filled = np.zeros((TILE, TILE), bool)
    filled[:, ::8] = True
    assert (tile[filled] == (200, 120, 40)).all() and not tile[~filled & ~region].any()  # nothing painted outside
    inner = cv2.erode(region.astype(np.uint8), np.ones((17, 17), np.uint8)).astype(bool) & ~filled
    assert inner.sum() > 1000  # holes far from the region's edge (where the black outside bleeds in)
    diff = np.abs(tile[inner].astype(int) - (200, 120, 40))  # Telea from one colour (and a little black)
    assert np.median(diff) <= 1 and diff.max() <= 12


def test_absent_parts_give_black_tiles_and_texture(regions):
    photo, iuv = scene()
    assert not texture_map(photo + 100, iuv, regions).any()  # no body at all
    photo[:] = 250
    iuv[:32, :, 0] = 3  # only part 3
    iuv[:32, :, 1] = np.linspace(0, 255, 48, dtype=np.uint8)
    iuv[:32, :, 2] = np.linspace(60, 190, 32, dtype=np.uint8)[:, None]  # rows through the tile's middle
    tiles = part_tiles(photo, iuv, regions)
    assert tiles[2].any() and not np.delete(tiles, 2, axis=0).any()
    texture = texture_map(photo, iuv, regions)
    gather = texture_gather()
    from_part_3 = (gather >= 2 * TILE * TILE) & (gather < 3 * TILE * TILE)
    assert texture.shape == (512, 512, 3) and texture.dtype == np.uint8
    assert not texture[~from_part_3].any() and texture[from_part_3].any()


def test_black_photo_pixels_count_as_holes_not_as_colour(regions):
    photo, iuv = scene()
    iuv[..., 0], iuv[..., 1], iuv[..., 2] = 4, 100, 100  # every pixel at one texel, all black
    assert not part_tiles(photo, iuv, regions).any()  # MCLD's 0/0 scaling: black, and no crash


def test_the_gather_table_is_uvtextureconverter_s_mapping():
    """Our one-indexing texture against the package's own loop, on random tiles laid out and
    transposed as MCLD does before ``split_atlas_tex``."""
    from UVTextureConverter import Atlas2Normal

    tiles = np.random.default_rng(0).integers(1, 256, (NUM_PARTS, TILE, TILE, 3), dtype=np.uint8)
    atlas = tiles.reshape(4, 6, TILE, TILE, 3).transpose(1, 2, 0, 3, 4).reshape(6 * TILE, 4 * TILE, 3)
    theirs = Atlas2Normal(atlas_size=TILE, normal_size=512).convert(Atlas2Normal.split_atlas_tex(atlas.transpose(1, 0, 2)))
    theirs = (theirs * 255).astype(np.uint8)
    gather = texture_gather()
    ours = np.where(gather[..., None] >= 0, tiles.reshape(-1, 3)[np.maximum(gather, 0)], 0)
    assert (ours == theirs).all()
    assert 0.5 < (gather >= 0).mean() < 0.9


def test_colours_pass_through_in_the_photo_s_channel_order(regions):
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)
    iuv = np.stack([rng.integers(0, 25, (96, 64)), rng.integers(0, 256, (96, 64)), rng.integers(0, 256, (96, 64))],
                   -1).astype(np.uint8)
    rgb = texture_map(photo, iuv, regions)
    assert rgb.any()
    assert (texture_map(photo[..., ::-1].copy(), iuv, regions) == rgb[..., ::-1]).all()


def test_inputs_are_checked_with_clear_errors(regions):
    photo, iuv = scene(64, 48)
    with pytest.raises(TextureInputError, match=r"photo \(48×64\) and its IUV image \(40×64\)"):
        texture_map(photo, iuv[:, :40], regions)
    with pytest.raises(TextureInputError, match="IUV image as an H×W×3 uint8 array; got float32"):
        texture_map(photo, iuv.astype(np.float32), regions)
    with pytest.raises(TextureInputError, match="photo"):
        texture_map(photo[..., 0], iuv, regions)
    assert issubclass(TextureInputError, UserError)


def test_inpainting_in_threads_gives_the_same_texture(regions):
    rng = np.random.default_rng(2)
    photo = rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)
    iuv = np.stack([rng.integers(0, 25, (80, 60)), rng.integers(0, 256, (80, 60)), rng.integers(0, 256, (80, 60))],
                   -1).astype(np.uint8)
    assert np.array_equal(texture_map(photo, iuv, regions, workers=4), texture_map(photo, iuv, regions))
