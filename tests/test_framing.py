"""Real photos of any size and shape (preprocess/framing.py, engine.inputs): framed around the person
for the model, the answer blended back into the photo at full resolution."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine import registry
from engine.options import ResultView
from engine.registry import Task
from engine.service import Engine
from errors import OptionError
from engine.setup import ModelSetup, WeightSource
from preprocess.framing import Box, blend_mask, canvas_box, crop_to_model, frame_box, paste_back
from preprocess.images import MODEL_SIZE, fit_to_canvas, load_image
from preprocess.masks import GarmentType, TryOnModel
from preprocess.openpose import NoPersonError
from tests.conftest import ROOT

GARMENT = ROOT / "examples/garment/striped_tee.png"


def figure(size: tuple[int, int], box: tuple[int, int, int, int], background=(255, 255, 255, 255),
           mode: str = "RGB") -> Image.Image:
    """A person-like figure (body and head, in two colours) filling ``box`` on a plain background."""
    img = Image.new(mode, size, background if mode == "RGBA" else background[:3])
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    head = (y1 - y0) // 8
    d.ellipse((x0 + (x1 - x0) // 3, y0, x1 - (x1 - x0) // 3, y0 + head), fill=(210, 160, 130, 255)[:len(mode)])
    d.rectangle((x0, y0 + head, x1 - 1, y1 - 1), fill=(40, 60, 90, 255)[:len(mode)])
    return img


def _holds(outer: Box, inner: tuple[int, int, int, int]) -> bool:
    return outer.x0 <= inner[0] and outer.y0 <= inner[1] and outer.x1 >= inner[2] and outer.y1 >= inner[3]


# -- geometry -------------------------------------------------------------------------------------------
def test_a_framed_portrait_gives_todays_model_input():
    photo = figure((1536, 2048), (400, 60, 1150, 2048))
    box = frame_box(Box(400, 60, 1150, 2048), photo.size)
    assert box == Box(0, 0, 1536, 2048)
    assert np.array_equal(np.asarray(crop_to_model(photo, box)), np.asarray(fit_to_canvas(photo)))


@pytest.mark.parametrize("size, person", [
    ((3000, 2000), (1900, 400, 2300, 1800)),  # landscape, off-centre
    ((1200, 4000), (100, 200, 1100, 3900)),  # tall and narrow: padded at the sides
    ((240, 320), (60, 40, 180, 300)),  # small
    ((2000, 1500), (0, 0, 400, 1500)),  # touching the photo's edges
])
def test_the_box_is_3_by_4_holds_the_person_and_leaves_the_photo_only_where_it_must(size, person):
    box = frame_box(Box(*person), size)
    assert abs(box.width / box.height - 3 / 4) < 0.002
    assert _holds(box, person)
    for lo, hi, length, limit in ((box.x0, box.x1, box.width, size[0]), (box.y0, box.y1, box.height, size[1])):
        if length <= limit:
            assert 0 <= lo and hi <= limit  # fits: inside
        else:
            assert lo < 0 and hi > limit and abs(-lo - (hi - limit)) <= 1  # too large: padded on both sides


def test_a_box_longer_than_the_photo_covers_all_of_it_and_reaches_out_only_past_its_ends():
    box = frame_box(Box(0, 0, 100, 1000), (600, 1000))  # a narrow photo, its person at the left edge
    assert box.x0 <= 0 and box.x1 >= 600 and (box.x0 == 0 or box.x1 == 600)  # no photo column is cut
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 60, 3), dtype=np.uint8)).resize((6000, 8000))
    assert np.array_equal(np.asarray(crop_to_model(big, Box(0, 0, 6000, 8000))), np.asarray(fit_to_canvas(big)))


def test_crop_and_paste_back_agree_on_where_each_pixel_goes():
    """An unchanged picture of a padded, scaled box pasted back gives the photo again, up to the two
    resamplings (a smooth photo: within a few levels), with no shift at the padded edges (a shift of
    half a model pixel there would show as a band of large differences)."""
    smooth = np.random.default_rng(2).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    photo = Image.fromarray(smooth).resize((1500, 2000), Image.Resampling.BICUBIC)
    box = Box(-300, 100, 1200, 2100)  # reaches out at the left and the bottom
    everything = Image.new("L", MODEL_SIZE, 255)
    back = np.asarray(paste_back(photo, crop_to_model(photo, box), box, everything)).astype(int)
    part = box.inside(photo.size)
    diff = np.abs(back - np.asarray(photo).astype(int))[part.y0:part.y1, part.x0:part.x1]
    # the padded edge included: past the filter's reach into the white padding (2 photo pixels here)
    assert diff.mean() < 1.5 and diff[:, 3:20].mean() < 2.5 and diff[-20:-3].mean() < 2.5
    assert np.array_equal(back[:part.y0], np.asarray(photo)[:part.y0])  # outside the box: untouched


def test_crop_pads_with_white_where_the_photo_ends():
    photo = figure((1200, 4000), (100, 200, 1100, 3900))
    box = frame_box(Box(100, 200, 1100, 3900), photo.size)
    crop = np.asarray(crop_to_model(photo, box))
    assert crop.shape == (1024, 768, 3) and (crop[:, :5] == 255).all() and (crop[:, -5:] == 255).all()


def test_pasting_back_an_unchanged_picture_of_a_model_sized_photo_gives_the_photo_byte_for_byte():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 768, 3), dtype=np.uint8))
    box = Box(0, 0, 768, 1024)
    mask = Image.new("L", MODEL_SIZE)
    mask.paste(255, (100, 100, 600, 900))
    assert np.array_equal(np.asarray(paste_back(photo, crop_to_model(photo, box), box, mask)), np.asarray(photo))


def test_canvas_box_is_what_fit_to_canvas_shows():
    assert canvas_box((3000, 2000)) == Box(0, -1000, 3000, 3000)
    assert canvas_box((768, 1024)) == Box(0, 0, 768, 1024)


# -- the whole path: stand-in preprocessing, a photo in, a photo out -------------------------------------
def _upright(img: Image.Image) -> Image.Image:
    return load_image(img)


def _exif_rotated() -> tuple[bytes, tuple[int, int, int, int]]:
    """A JPEG stored sideways (3000x2000) with EXIF orientation 6: upright it is 2000x3000."""
    upright = figure((2000, 3000), (600, 500, 1300, 2900))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes; the EXIF says how to turn it
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), (600, 500, 1300, 2900)


PHOTOS = {
    "landscape": lambda: (figure((3000, 2000), (1900, 400, 2300, 1800)), (1900, 400, 2300, 1800)),
    "tall": lambda: (figure((1200, 4000), (100, 200, 1100, 3900)), (100, 200, 1100, 3900)),
    "small": lambda: (figure((240, 320), (60, 40, 180, 300)), (60, 40, 180, 300)),
    "exif": _exif_rotated,
    "rgba": lambda: (figure((1600, 1200), (700, 100, 1000, 1100), background=(0, 0, 0, 0), mode="RGBA"),
                     (700, 100, 1000, 1100)),
    "edge": lambda: (figure((2000, 1500), (0, 0, 400, 1500)), (0, 0, 400, 1500)),
}


@pytest.fixture(scope="module")
def engine():
    return Engine.create(ModelSetup(), WeightSource(tiny=True))


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_a_photo_comes_back_at_its_size_changed_only_where_the_garment_goes(engine, name):
    source, person = PHOTOS[name]()
    inputs = engine.tryon_inputs(source, GARMENT, TryOnModel.VITON_HD, GarmentType.UPPER_BODY, view=ResultView.PHOTO)
    framing = inputs.framing
    upright = _upright(Image.open(io.BytesIO(source)) if isinstance(source, bytes) else source)
    assert framing.photo.size == upright.size and framing.people == 1
    assert _holds(framing.box, person)  # the crop holds the whole figure
    assert inputs.person.size == MODEL_SIZE
    generated = Image.new("RGB", MODEL_SIZE, (255, 0, 0))  # stands in for the model's picture
    out = engine.answer(generated, framing, inputs.mask, ResultView.PHOTO)
    assert out.size == upright.size and out.mode == "RGB"
    before, after = np.asarray(upright), np.asarray(out)
    part = framing.box.inside(upright.size)
    weights = np.zeros(upright.size[::-1], np.uint8)
    weights[part.y0:part.y1, part.x0:part.x1] = blend_mask(inputs.mask, framing.box, part)
    assert np.array_equal(before[weights == 0], after[weights == 0])  # outside the blend region: the photo
    assert (weights == 255).any() and (after[weights == 255] == (255, 0, 0)).all()  # the mask: the model's answer


def test_the_other_views(engine):
    photo, person = PHOTOS["landscape"]()
    framed = engine.tryon_inputs(photo, GARMENT, TryOnModel.VITON_HD, GarmentType.UPPER_BODY, view=ResultView.FRAMED)
    exact = frame_box(Box(*person), photo.size)  # the person found on a low-resolution look: within a few pixels
    assert _holds(framed.framing.box, person) and abs(framed.framing.box.height - exact.height) <= 8
    assert engine.answer(framed.person, framed.framing, framed.mask, ResultView.FRAMED) is framed.person
    canvas = engine.tryon_inputs(photo, GARMENT, TryOnModel.VITON_HD, GarmentType.UPPER_BODY, view=ResultView.CANVAS)
    assert canvas.framing is None and np.array_equal(np.asarray(canvas.person), np.asarray(fit_to_canvas(photo)))


def test_several_people_the_largest_is_framed_and_nobody_is_a_clear_error(engine, monkeypatch):
    photo = figure((3000, 2000), (200, 300, 500, 1900))
    people = [Box(200, 300, 500, 1900), Box(2000, 800, 2200, 1500)]
    monkeypatch.setattr(engine.preprocessor, "people", lambda img, *finder: people)
    inputs = engine.tryon_inputs(photo, GARMENT, TryOnModel.VITON_HD, GarmentType.UPPER_BODY, view=ResultView.PHOTO)
    assert inputs.framing.people == 2 and _holds(inputs.framing.box, (200, 300, 500, 1900))
    monkeypatch.setattr(engine.preprocessor, "people", lambda img, *finder: [])
    with pytest.raises(NoPersonError, match="no person detected in the person photo"):
        engine.tryon_inputs(photo, GARMENT, TryOnModel.VITON_HD, GarmentType.UPPER_BODY, view=ResultView.PHOTO)


def test_pose_transfer_frames_both_photos(engine):
    person, box = PHOTOS["landscape"]()
    target, target_box = PHOTOS["tall"]()
    inputs = engine.pose_inputs(person, target, view=ResultView.FRAMED)
    assert _holds(inputs.reference_framing.box, box) and _holds(inputs.target_framing.box, target_box)
    assert inputs.reference.size == inputs.target.size == MODEL_SIZE
    with pytest.raises(OptionError, match="pose transfer answers with the model's picture"):
        engine.pose_inputs(person, target, view=ResultView.PHOTO)


def test_cli_gives_a_landscape_photo_back_for_a_landscape_photo(tmp_path):
    from cli.main import main

    from PIL import ImageCms

    photo, _ = PHOTOS["landscape"]()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    photo.save(tmp_path / "person.jpg", quality=95, icc_profile=icc)  # a phone photo carries its colour profile
    assert main(["tryon", "--tiny", "--person", str(tmp_path / "person.jpg"), "--garment", str(GARMENT),
                 "--steps", "1", "--out", str(tmp_path / "out.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (2000, 3000, 3)  # through the tiny model: far from the person, the photo's own pixels
    assert np.array_equal(out[:, :1000], np.asarray(load_image(tmp_path / "person.jpg"))[:, :1000])
    assert Image.open(tmp_path / "out.png").info.get("icc_profile") == icc  # its colours, as the photo's
    assert main(["tryon", "--tiny", "--person", str(tmp_path / "person.jpg"), "--garment", str(GARMENT),
                 "--steps", "1", "--result", "framed", "--out", str(tmp_path / "framed.png")]) == 0
    assert Image.open(tmp_path / "framed.png").size == MODEL_SIZE


def test_bad_photos_are_clear_messages(engine, tmp_path):
    from errors import UserError

    with pytest.raises(NoPersonError, match="no person detected"):
        engine.tryon_inputs(Image.new("RGB", (1200, 1600), "white"), GARMENT, TryOnModel.VITON_HD,
                            GarmentType.UPPER_BODY, view=ResultView.PHOTO)
    with pytest.raises(UserError, match="the person photo is 1x1 pixels, too small to find a person in"):
        engine.tryon_inputs(Image.new("RGB", (1, 1), "black"), GARMENT, TryOnModel.VITON_HD, GarmentType.UPPER_BODY,
                            view=ResultView.PHOTO)
    big = tmp_path / "big.png"  # over the 50 MP limit: refused from its header, before decoding
    Image.new("1", (8000, 6400)).save(big)
    with pytest.raises(UserError, match="is too large .*the limit is 50 MP"):
        engine.tryon_inputs(big, GARMENT, TryOnModel.VITON_HD, GarmentType.UPPER_BODY, view=ResultView.PHOTO)
    assert registry.default_for(Task.TRYON).task is Task.TRYON


# -- the app's parts --------------------------------------------------------------------------------------
def test_a_click_on_the_photo_maps_through_the_box_the_model_saw():
    from engine.service import Generation
    from errors import UserError
    from webapp.components import Sample, Shown

    gen = Generation(Image.new("RGB", MODEL_SIZE), 0, 1, Image.new("RGB", MODEL_SIZE), None)
    samples = (Sample(Image.new("RGB", (3000, 2000)), gen),)
    shown = Shown(samples, Box(1000, 500, 1768, 1524))  # the photo is shown; the model saw this box of it
    assert shown.point(1384, 1012, on_result=True) == (0.5, 0.5)
    with pytest.raises(UserError, match="outside the part of your photo the model saw"):
        shown.point(0, 0, on_result=True)
    assert shown.point(384, 512, on_result=False) == (0.5, 0.5)  # on the model's picture itself
    assert Shown(samples).point(384, 512, on_result=True) == (0.5, 0.5)  # the model's picture is shown


def test_the_progress_says_how_long_is_left_once_steps_have_run():
    from webapp.components import reporter

    seen, now = [], [0.0]
    report = reporter(lambda fraction, desc: seen.append(desc), clock=lambda: now[0])
    report(0.0, "Preprocessing the photos")
    for step in range(4):
        report(0.1 + step / 10, f"Denoising step {step}/30")
        now[0] += 2.0  # two seconds a step
    report(0.95, "Decoding the image")
    assert seen[:3] == ["Preprocessing the photos", "Denoising step 0/30", "Denoising step 1/30"]
    assert seen[3] == "Denoising step 2/30 (about 56 s left)"  # measured from the end of the first step
    assert seen[4] == "Denoising step 3/30 (about 54 s left)" and seen[-1] == "Decoding the image"


def test_an_upload_without_a_path_is_named_plainly():
    from errors import UserError
    from webapp.tryon_tab import TRYON_PARAMETERS, TryOnRequest

    values = dict.fromkeys(TRYON_PARAMETERS)
    values.update(person={"path": None}, garment=str(GARMENT))
    with pytest.raises(UserError, match="^The person photo did not arrive completely; upload it again.$"):
        TryOnRequest.from_values(values, registry.default_for(Task.TRYON).limits)
    values["person"] = None
    with pytest.raises(UserError, match="^Upload a person photo first.$"):
        TryOnRequest.from_values(values, registry.default_for(Task.TRYON).limits)
