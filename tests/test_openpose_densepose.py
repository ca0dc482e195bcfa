"""OpenPose network loading and decoding; DensePose renderings."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from preprocess.densepose import (
    DensePoseInstance,
    iuv_image,
    iuv_pose_rgb,
    photo_iuv,
    render_iuv,
    render_labels,
    render_segmentation,
)
from preprocess.openpose import (
    LIMBS,
    PAF_CHANNELS,
    BodyPoseNet,
    NoPersonError,
    OpenPoseDetector,
    decode_people,
    draw_keypoints,
    heatmap_candidates,
    load_body_pose_weights,
    match_limb,
)
from weightfiles.checkpoint import CheckpointError


# -- OpenPose network ------------------------------------------------------------------------
def _flat_state_dict(net):
    """The published file's layout: CMU layer names without our block prefixes."""
    return {k.split(".", 1)[1]: torch.randn_like(v) for k, v in net.state_dict().items()}


def test_loads_cmu_key_layout():
    net = BodyPoseNet()
    flat = _flat_state_dict(net)
    assert len(flat) == 184 and "conv1_1.weight" in flat and "Mconv7_stage6_L2.bias" in flat
    assert flat["Mconv1_stage2_L1.weight"].shape == (128, 185, 7, 7)
    load_body_pose_weights(net, flat)
    assert torch.equal(net.model6_2.Mconv7_stage6_L2.bias, flat["Mconv7_stage6_L2.bias"])
    assert torch.equal(net.model0.conv1_1.weight, flat["conv1_1.weight"])


def test_load_is_strict():
    net = BodyPoseNet()
    flat = _flat_state_dict(net)
    flat.pop("conv5_5_CPM_L1.bias")
    flat["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: model1_1\.conv5_5_CPM_L1\.bias.*unexpected keys: extra\.weight"):
        load_body_pose_weights(net, flat, "body_pose_model.pth")


def test_network_runs_and_detector_reads_file(tmp_path):
    net = BodyPoseNet().eval()
    path = tmp_path / "body_pose_model.pth"
    torch.save(_flat_state_dict(net), path)
    det = OpenPoseDetector.from_file(path)
    with torch.no_grad():
        paf, heat = det.net(torch.zeros(1, 3, 64, 48))
    assert paf.shape == (1, 38, 8, 6) and heat.shape == (1, 19, 8, 6)
    heat_map, paf_map = det.maps(np.zeros((100, 70, 3), np.uint8))
    assert heat_map.shape == (100, 70, 19) and paf_map.shape == (100, 70, 38)


# -- decoding -------------------------------------------------------------------------------
SKELETON = np.array([[192, 80], [192, 125], [150, 135], [135, 215], [130, 290], [234, 135], [249, 215],
                     [254, 290], [165, 290], [165, 370], [165, 450], [219, 290], [219, 370], [219, 450],
                     [184, 72], [200, 72], [175, 76], [209, 76]], np.float32)


def plant(people: list[np.ndarray], h=512, w=384, sigma=4.0, band=3.0):
    """Heatmaps with Gaussians at the keypoints and PAFs with unit vectors along each limb."""
    heat = np.zeros((h, w, 19), np.float32)
    paf = np.zeros((h, w, 38), np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    for pts in people:
        for i, (x, y) in enumerate(pts):
            heat[:, :, i] = np.maximum(heat[:, :, i], np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)))
        for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
            pa, pb = pts[a], pts[b]
            d = pb - pa
            length = np.hypot(*d)
            u = d / length
            t = ((xs - pa[0]) * u[0] + (ys - pa[1]) * u[1])
            dist = np.abs((xs - pa[0]) * u[1] - (ys - pa[1]) * u[0])
            on = (t >= 0) & (t <= length) & (dist <= band)
            paf[on, cx], paf[on, cy] = u[0], u[1]
    return heat, paf


def test_decoder_recovers_planted_keypoints():
    people = decode_people(*plant([SKELETON]))
    assert len(people) == 1
    np.testing.assert_allclose(people[0][:, :2], SKELETON, atol=1.0)
    assert (people[0][:, 2] > 0.9).all()


def test_decoder_separates_two_people_and_detector_takes_the_largest():
    small = (SKELETON - SKELETON.mean(0)) * 0.5 + np.array([330, 250])
    big = SKELETON.copy()
    big[:, 0] -= 60
    people = decode_people(*plant([big, small], w=420))
    assert len(people) == 2

    class Planted(torch.nn.Module):  # a network whose output decodes to the two people
        def forward(self, x):
            heat, paf = plant([big, small], w=420)
            return (torch.from_numpy(paf).permute(2, 0, 1)[None], torch.from_numpy(heat).permute(2, 0, 1)[None])

    det = OpenPoseDetector(Planted())
    det.maps = lambda rgb: plant([big, small], w=420)
    np.testing.assert_allclose(det(np.zeros((512, 420, 3), np.uint8)), big, atol=1.0)


def test_missing_points_are_zero():
    partial = SKELETON.copy()
    heat, paf = plant([partial])
    heat[:, :, 4] = 0  # no right wrist
    (person,) = decode_people(heat, paf)
    assert person[4].tolist() == [0, 0, 0]
    np.testing.assert_allclose(person[3, :2], SKELETON[3], atol=1.0)


def test_person_without_neck_is_merged_from_its_parts():
    """No neck: the arms and the head start as separate partial people and are merged by the
    ear-shoulder limbs (which never start a person); each leg (3 parts) is dropped."""
    heat, paf = plant([SKELETON])
    heat[:, :, 1] = 0
    (person,) = decode_people(heat, paf)
    present = [0, 2, 3, 4, 5, 6, 7, 14, 15, 16, 17]
    np.testing.assert_allclose(person[present, :2], SKELETON[present], atol=1.0)
    assert (person[present, 2] > 0.9).all()
    assert not person[[1, 8, 9, 10, 11, 12, 13]].any()


def test_decoding_steps():
    heat, paf = plant([SKELETON])
    ids_by_part, candidates = heatmap_candidates(heat)
    assert [len(ids) for ids in ids_by_part] == [1] * 18 and ids_by_part[5] == [5]
    np.testing.assert_allclose(np.array(candidates)[:, :2], SKELETON, atol=1.0)
    (a, b), (cx, cy) = LIMBS[1], PAF_CHANNELS[1]  # neck -> left shoulder
    ((id_a, id_b, score),) = match_limb(ids_by_part[a], ids_by_part[b], candidates,
                                        paf[:, :, cx], paf[:, :, cy], 512)
    assert (id_a, id_b) == (1, 5) and 0.8 < score <= 1.0  # mean PAF projection, no length penalty
    # the wrong pairing (left shoulder's candidate as the right shoulder's PAF partner) scores nothing
    (cx, cy) = PAF_CHANNELS[0]
    assert match_limb(ids_by_part[1], ids_by_part[5], candidates, paf[:, :, cx], paf[:, :, cy], 512) == []


def test_no_person_is_a_clear_error():
    class Blank(torch.nn.Module):
        def forward(self, x):
            n, _, h, w = x.shape
            return torch.zeros(n, 38, h // 8, w // 8), torch.zeros(n, 19, h // 8, w // 8)

    with pytest.raises(NoPersonError, match="no person detected"):
        OpenPoseDetector(Blank())(np.full((512, 384, 3), 200, np.uint8))


def test_draw_keypoints():
    from PIL import Image

    out = draw_keypoints(Image.new("RGB", (384, 512), "white"), SKELETON)
    assert out.size == (384, 512)
    assert np.asarray(out)[int(SKELETON[0, 1]), int(SKELETON[0, 0])].tolist() == [255, 0, 0]


# -- DensePose renderings -----------------------------------------------------------------------
def _instance(x=10, y=20, w=6, h=4, score=0.9, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 25, (h, w)).astype(np.uint8)
    labels[0, 0] = 0
    uv = rng.uniform(0.2, 0.8, (2, h, w)).astype(np.float32)
    return DensePoseInstance((x, y, w, h), labels, uv, score)


def _parula_expected(label: int) -> list[int]:
    """Spec: floor(0.7 · PARULA(l·255/24)), OpenCV colormap, BGR -> RGB; background black."""
    if label == 0:
        return [0, 0, 0]
    value = np.uint8(min(255.0, label * 255.0 / 24))
    bgr = cv2.applyColorMap(np.full((1, 1), value, np.uint8), cv2.COLORMAP_PARULA)[0, 0]
    return [int(np.floor(0.7 * c)) for c in bgr[::-1]]


def test_segmentation_rendering_exact_values():
    a, b = _instance(), _instance(x=30, y=5, seed=1)
    img = np.asarray(render_segmentation([a, b], (48, 40)))
    assert img.shape == (40, 48, 3)
    for inst in (a, b):
        x, y, w, h = inst.box
        for j in range(h):
            for i in range(w):
                assert img[y + j, x + i].tolist() == _parula_expected(int(inst.labels[j, i]))
    mask = np.zeros((40, 48), bool)
    for inst in (a, b):
        x, y, w, h = inst.box
        mask[y:y + h, x:x + w] = True
    assert (img[~mask] == 0).all()


def test_label_rendering_is_top_instance_part_labels():
    a, b = _instance(), _instance(x=30, y=5, seed=1)
    img = np.asarray(render_labels([a, b], (48, 40)))
    assert (img[20:24, 10:16] == a.labels[:, :, None]).all()
    assert (img[5:9, 30:36] == 0).all()  # only the top instance


def test_iuv_rendering():
    inst = _instance()
    img = np.asarray(render_iuv([inst], (48, 40))).astype(int)
    u, v = inst.uv
    lo, hi = inst.uv.min(), inst.uv.max()
    block = img[20:24, 10:16]
    np.testing.assert_array_equal(block[:, :, 0], ((u - lo) / (hi - lo) * 255).astype(np.uint8))
    np.testing.assert_array_equal(block[:, :, 1], ((v - lo) / (hi - lo) * 255).astype(np.uint8))
    np.testing.assert_array_equal(block[:, :, 2], inst.labels)
    assert block[:, :, :2].max() == 255 and block[:, :, :2].min() == 0  # jointly min-max scaled
    img[20:24, 10:16] = 0
    assert (img == 0).all()


def test_boxes_are_clipped_to_the_canvas():
    img = np.asarray(render_segmentation([_instance(x=45, y=38)], (48, 40)))
    assert img.shape == (40, 48, 3)


def test_instance_checks_shapes():
    with pytest.raises(ValueError, match="do not fit box"):
        DensePoseInstance((0, 0, 5, 5), np.zeros((4, 5), np.uint8), np.zeros((2, 4, 5), np.float32))


# -- MCLD's IUV image ------------------------------------------------------------------------------
def _mcld_formula(inst: DensePoseInstance) -> np.ndarray:
    """MCLD's ``parse_iuv``, written out: labels as float, float32 U·255 / V·255 widened to float."""
    i = inst.labels.astype(float)
    uv = (inst.uv * 255.0).astype(float)
    return np.transpose(np.stack((i, uv[0], uv[1])), (1, 2, 0))


def test_mcld_iuv_image_layout_and_placement():
    top, other = _instance(x=10, y=20, w=6, h=4, seed=0), _instance(x=30, y=5, seed=1, score=0.5)
    img = iuv_image([top, other], 40, 48)  # height, width
    assert img.dtype == np.uint8 and img.shape == (40, 48, 3)
    block = img[20:24, 10:16]  # rows y..y+h, columns x..x+w
    np.testing.assert_array_equal(block[:, :, 0], top.labels)  # channel 0: part index I
    np.testing.assert_array_equal(block[:, :, 1], (top.uv[0] * np.float32(255)).astype(np.uint8))  # U·255
    np.testing.assert_array_equal(block[:, :, 2], (top.uv[1] * np.float32(255)).astype(np.uint8))  # V·255
    np.testing.assert_array_equal(block, _mcld_formula(top).astype(np.uint8))
    rest = img.copy()
    rest[20:24, 10:16] = 0
    assert (rest == 0).all()  # the second person is not drawn, nothing outside the box
    rgb = np.asarray(iuv_pose_rgb([top, other], 40, 48))  # the PNG as PIL reads it: R = V, G = U, B = I
    np.testing.assert_array_equal(rgb, img[:, :, ::-1])
    assert rgb[20, 10, 2] == top.labels[0, 0] and rgb[21, 11, 0] == img[21, 11, 2]


def test_mcld_iuv_values_are_truncated():
    inst = _instance(x=0, y=0, w=2, h=2)
    inst.uv[0] = [[0.5, 0.999], [1.0, 0.0]]  # 127.5 -> 127, 254.7 -> 254: truncated, not rounded
    inst.uv[1] = [[0.2, 0.7], [0.3, -0.01]]  # -2.55: outside 0..255, wraps as MCLD's cast does
    img = iuv_image([inst], 3, 3)
    assert img[:2, :2, 1].tolist() == [[127, 254], [255, 0]]
    assert img[:2, :2, 2].tolist()[0] == [51, 178]
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(img[:2, :2], _mcld_formula(inst).astype(np.uint8))


def test_mcld_iuv_nobody_and_photos():
    assert iuv_image([], 40, 48) is None and iuv_pose_rgb([], 40, 48) is None
    seen = []

    def model(rgb):
        seen.append(rgb)
        return [_instance(x=1, y=2, w=3, h=2)]

    from PIL import Image

    photo = Image.new("L", (7, 5), 128)  # grey, 7 wide, 5 high
    img = photo_iuv(model, photo)
    assert img.shape == (5, 7, 3) and seen[0].shape == (5, 7, 3) and seen[0].dtype == np.uint8
    assert img[2:4, 1:4].any() and not img[:2].any()
    assert photo_iuv(lambda rgb: [], np.zeros((5, 7, 3), np.uint8)) is None
