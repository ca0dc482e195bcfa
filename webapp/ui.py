"""The Gradio UI: ``create_demo(predictor)`` builds it, ``launch(demo, settings)`` serves it."""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from leffa import CheckpointError, MissingWeightsError, ModelKind
from preprocess.images import MODEL_SIZE, ImageLoadError, fit_label_image, load_image, load_label_image
from preprocess.openpose import NoPersonError
from webapp.attention_view import heatmap_overlay, layer_groups, warped_reference
from webapp.predict import MAX_SEED, GenerateOptions, Generation, Predictor, _free_accelerator_memory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MASK_COLOUR = (255, 0, 255)
USER_ERRORS = (ImageLoadError, NoPersonError, MissingWeightsError, CheckpointError, ValueError)

HEADER = """# Leffa: virtual try-on and pose transfer
Re-implementation of *Learning Flow Fields in Attention for Controllable Person Image Generation*
(Zhou et al., CVPR 2025) with the authors' published weights. Upload a person and a garment, check
the mask (paint to add, erase to remove), then **Generate**. Click a point of the result to see where
it looked in the garment (turn on *Record attention maps* first)."""
TINY_BANNER = """> ⚠️ **Offline demo mode (`--tiny`)**: a tiny **untrained** model with random weights and
> stand-in preprocessing. Everything runs, but the pictures are noise. Start without `--tiny` for the real models."""


def user_errors(fn):
    """Turn the failures a user can act on into ``gr.Error`` messages; the app keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except torch.cuda.OutOfMemoryError:
            _free_accelerator_memory()
            raise gr.Error("Out of GPU memory. Try again with fewer steps or without attention recording; "
                           "the server keeps running.") from None
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None

    return wrapper


def upload_path(payload, what: str) -> str | None:
    """The cached file of an upload (events run with preprocess=False, so that our own loader,
    not Gradio's, reads every upload and reports bad files clearly)."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else payload
    if not isinstance(path, str) or not path:
        raise gr.Error(f"The {what} did not arrive completely; upload it again.")
    return path


def _need(payload, what: str) -> str:
    path = upload_path(payload, what)
    if path is None:
        raise gr.Error(f"Upload {what} first.")
    return path


def editor_value(person: Image.Image, mask: Image.Image) -> dict:
    """The mask as a paintable layer over the person."""
    layer = np.zeros((mask.height, mask.width, 4), np.uint8)
    on = np.asarray(mask) > 0
    layer[on] = (*MASK_COLOUR, 160)
    return {"background": person, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}


def mask_from_editor(value) -> Image.Image | None:
    """The union of the painted layers (None when the editor holds no layer)."""
    if not value or not value.get("layers"):
        return None
    painted = None
    for layer in value["layers"]:
        if layer is None:
            continue
        if not isinstance(layer, Image.Image):
            layer = upload_path(layer, "mask layer")
        alpha = np.asarray(load_image(layer, name="mask layer", keep_alpha=True).convert("RGBA"))[:, :, 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None:
        return None
    if not painted.any():
        raise gr.Error("The mask is empty: paint the region to replace, or press 'Recompute mask'.")
    mask = Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")
    return fit_label_image(mask)


def _examples(folder: str) -> list[str]:
    return sorted(str(p) for p in (EXAMPLES / folder).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))


def _options(steps, guidance, seed, random_seed, ref_acceleration, repaint, record) -> GenerateOptions:
    return GenerateOptions(int(steps), float(guidance), None if random_seed else int(seed or 0),
                           bool(ref_acceleration), bool(repaint), bool(record))


def _attention_outputs(gen: Generation):
    """(state, layer-group dropdown, step dropdown) after a generation."""
    if gen.recorder is None:
        return None, gr.update(choices=[], value=None), gr.update(choices=[], value=None)
    groups = list(layer_groups(gen.recorder))
    steps = gen.recorder.steps()
    return gen, gr.update(choices=groups, value=groups[0]), gr.update(choices=steps, value=steps[-1])


def create_demo(predictor: Predictor) -> gr.Blocks:
    tiny = predictor.tiny
    step_range = (1, 100, 4) if tiny else (30, 100, 30)  # (min, max, default): the original's 30-100, 30

    # -- handlers ---------------------------------------------------------------------------------
    @user_errors
    def compute_mask(person, model_type, garment_type, keep_fixed):
        person = upload_path(person, "person photo")
        if person is None:
            return None, None, None
        pm = predictor.preprocessor.person_mask(person, model_type, garment_type, keep_fixed_regions=keep_fixed)
        return editor_value(pm.person, pm.mask), pm.parsing.image, pm.pose_image

    @user_errors
    def tryon(person, garment, editor, mask_upload, densepose_upload, model_type, garment_type, steps, guidance,
              seed, random_seed, ref_acceleration, repaint, preprocess_garment, keep_fixed, record,
              progress=gr.Progress(track_tqdm=True)):
        person, garment = _need(person, "a person photo"), _need(garment, "a garment photo")
        mask_upload = upload_path(mask_upload, "mask")
        progress(0, desc="Preprocessing")
        inputs = predictor.tryon_inputs(person, garment, model_type, garment_type, preprocess_garment,
                                        keep_fixed, densepose=upload_path(densepose_upload, "DensePose image"))
        mask = inputs.mask
        if mask_upload is not None:
            mask = load_label_image(mask_upload, "uploaded mask", binary=True)
        else:
            mask = mask_from_editor(editor) or mask
        kind = ModelKind.VITON_HD if model_type == "viton_hd" else ModelKind.DRESS_CODE
        gen = predictor.generate(kind, inputs.person, inputs.garment, mask, inputs.densepose,
                                 _options(steps, guidance, seed, random_seed, ref_acceleration, repaint, record),
                                 lambda f, d: progress(f, desc=d))
        return (gen.image, gen.seed, inputs.parsing, inputs.pose_image, mask, inputs.densepose,
                *_attention_outputs(gen))

    @user_errors
    def pose_transfer(person, target, densepose_upload, steps, guidance, seed, random_seed, ref_acceleration,
                      record, progress=gr.Progress(track_tqdm=True)):
        person = _need(person, "a photo of the person to keep")
        target = upload_path(target, "target-pose photo")
        densepose_upload = upload_path(densepose_upload, "DensePose image")
        if target is None and densepose_upload is None:
            raise gr.Error("Upload a photo in the target pose (or its DensePose image) first.")
        progress(0, desc="Preprocessing")
        if target is None:
            target = Image.new("RGB", MODEL_SIZE, "white")  # only its DensePose is used
        inputs = predictor.pose_inputs(person, target, densepose=densepose_upload)
        gen = predictor.generate(ModelKind.POSE_TRANSFER, inputs.target, inputs.person, inputs.mask, inputs.densepose,
                                 _options(steps, guidance, seed, random_seed, ref_acceleration, False, record),
                                 lambda f, d: progress(f, desc=d))
        return (gen.image, gen.seed, inputs.densepose, *_attention_outputs(gen))

    @user_errors
    def show_attention(state: Generation | None, group, step, evt: gr.SelectData):
        if state is None or state.recorder is None:
            raise gr.Error("Turn on 'Record attention maps' in the advanced options and generate first.")
        x, y = evt.index
        w, h = state.image.size
        point = (min(max(x / w, 0.0), 1.0), min(max(y / h, 0.0), 1.0))
        layers = layer_groups(state.recorder)[group]
        return heatmap_overlay(state.recorder, int(step), layers, point, state.reference)

    @user_errors
    def warp(state: Generation | None, group, step):
        if state is None or state.recorder is None:
            raise gr.Error("Turn on 'Record attention maps' in the advanced options and generate first.")
        return warped_reference(state.recorder, int(step), layer_groups(state.recorder)[group], state.reference)

    # -- layout -------------------------------------------------------------------------------------
    def generation_options(with_repaint: bool):
        steps = gr.Slider(*step_range[:2], value=step_range[2], step=1, label="Steps")
        guidance = gr.Slider(0.1, 5.0, value=2.5, step=0.1, label="Guidance scale")
        with gr.Row():
            seed = gr.Number(42, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            random_seed = gr.Checkbox(False, label="Random seed")
        ref_acceleration = gr.Checkbox(False, label="Reference acceleration (~30% faster, may slightly reduce quality)")
        repaint = gr.Checkbox(False, label="Repaint (keep the person's pixels outside the mask)", visible=with_repaint)
        record = gr.Checkbox(False, label="Record attention maps (slower; enables the attention panel)")
        return steps, guidance, seed, random_seed, ref_acceleration, repaint, record

    def input_row(prefix: str, *uploads_spec: tuple[str, str, str]):
        """Uploads with their example galleries, and the result column.

        ``uploads_spec``: (label, examples folder, element-id suffix) per upload."""
        uploads = []
        with gr.Row():
            for label, folder, key in uploads_spec:
                with gr.Column():
                    image = gr.Image(label=label, type="filepath", height=420, elem_id=f"{prefix}-{key}")
                    gr.Examples(_examples(folder), inputs=image, label=f"Examples: {folder}")
                    uploads.append(image)
            with gr.Column():
                result = gr.Image(label="Result (click a point: attention maps below)", type="pil", interactive=False,
                                  height=420, elem_id=f"{prefix}-result", format="png")
                seed_used = gr.Number(label="Seed used", interactive=False, precision=0)
                run = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate")
        return (*uploads, result, seed_used, run)

    def attention_panel(result, state, what: str):
        with gr.Accordion("Attention maps", open=False):
            gr.Markdown(f"Click a point on the result: the heatmap shows where it looked in the {what} "
                        "(averaged over the heads and the layers of one token grid).")
            with gr.Row():
                group = gr.Dropdown(label="Layer group (token grid)", choices=[], interactive=True)
                step = gr.Dropdown(label="Denoising step", choices=[], interactive=True)
            with gr.Row():
                heat = gr.Image(label=f"Where the point looked in the {what}", interactive=False, type="pil",
                                elem_id=f"heatmap-{what}")
                warped = gr.Image(label=f"The {what} warped by the attention flow", interactive=False, type="pil")
            warp_button = gr.Button(f"Warp the {what} by the attention flow")
        result.select(show_attention, [state, group, step], heat, api_visibility="private")
        warp_button.click(warp, [state, group, step], warped, api_visibility="private")
        return group, step

    with gr.Blocks(title="Leffa: virtual try-on and pose transfer") as demo:
        gr.Markdown(HEADER)
        if tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        with gr.Tab("Virtual try-on", id="tryon"):
            tryon_state = gr.State(None)
            person, garment, result, seed_used, run = input_row(
                "tryon", ("Person", "person", "person"), ("Garment", "garment", "garment"))
            with gr.Accordion("Mask and DensePose", open=True):
                with gr.Row():
                    editor = gr.ImageEditor(label="Mask: paint to add, erase to remove (magenta = replaced)",
                                            type="pil", brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                                            eraser=gr.Eraser(), sources=(), transforms=(), height=520,
                                            elem_id="tryon-mask-editor")
                    with gr.Column():
                        recompute = gr.Button("Recompute mask")
                        mask_upload = gr.Image(label="…or upload a mask (white = replace); overrides the editor",
                                               type="filepath")
                        densepose_upload = gr.Image(label="DensePose image (optional: replaces the computed one)",
                                                    type="filepath")
            with gr.Accordion("Advanced options", open=False):
                model_type = gr.Radio([("VITON-HD (recommended)", "viton_hd"), ("DressCode (experimental)", "dress_code")],
                                      value="viton_hd", label="Model type")
                garment_type = gr.Radio([("Upper body", "upper_body"), ("Lower body", "lower_body"), ("Dress", "dresses")],
                                        value="upper_body", label="Garment type")
                preprocess_garment = gr.Checkbox(False, label="Garment is a PNG cut-out (crop to its transparency)")
                keep_fixed = gr.Checkbox(False, label="Never mask other clothes, shoes and hands (full-body photos)")
                t_steps, t_guidance, t_seed, t_random, t_ref, t_repaint, t_record = generation_options(True)
            with gr.Accordion("Intermediate results", open=False):
                with gr.Row():
                    parsing_out = gr.Image(label="Human parsing", interactive=False, type="pil", format="png")
                    keypoints_out = gr.Image(label="Keypoints", interactive=False, type="pil", format="png")
                    mask_out = gr.Image(label="Mask used", interactive=False, type="pil", format="png")
                    densepose_out = gr.Image(label="DensePose", interactive=False, type="pil", format="png")
            t_group, t_step = attention_panel(result, tryon_state, "garment")

            mask_inputs = [person, model_type, garment_type, keep_fixed]
            mask_outputs = [editor, parsing_out, keypoints_out]
            for trigger in (person.change, model_type.change, garment_type.change, keep_fixed.change, recompute.click):
                trigger(compute_mask, mask_inputs, mask_outputs, api_visibility="private", preprocess=False)
            run.click(tryon,
                      [person, garment, editor, mask_upload, densepose_upload, model_type, garment_type, t_steps,
                       t_guidance, t_seed, t_random, t_ref, t_repaint, preprocess_garment, keep_fixed, t_record],
                      [result, seed_used, parsing_out, keypoints_out, mask_out, densepose_out, tryon_state, t_group,
                       t_step], api_name="tryon", preprocess=False)

        with gr.Tab("Pose transfer", id="pose"):
            pose_state = gr.State(None)
            p_person, p_target, p_result, p_seed_used, p_run = input_row(
                "pose", ("Person to keep", "person", "person"), ("Person in the target pose", "pose", "target"))
            with gr.Accordion("Advanced options", open=False):
                p_densepose = gr.Image(label="DensePose IUV image of the target pose (optional: replaces the computed one)",
                                       type="filepath")
                p_steps, p_guidance, p_seed, p_random, p_ref, _, p_record = generation_options(False)
            with gr.Accordion("Intermediate results", open=False):
                p_densepose_out = gr.Image(label="DensePose IUV of the target", interactive=False, type="pil", format="png")
            p_group, p_step = attention_panel(p_result, pose_state, "person")
            p_run.click(pose_transfer,
                        [p_person, p_target, p_densepose, p_steps, p_guidance, p_seed, p_random, p_ref, p_record],
                        [p_result, p_seed_used, p_densepose_out, pose_state, p_group, p_step], api_name="pose_transfer",
                        preprocess=False)
    return demo


def launch(demo: gr.Blocks, settings, **kwargs):
    """Serve with one generation at a time, a bounded queue and bounded uploads."""
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                       max_file_size=settings.max_file_size, allowed_paths=[str(EXAMPLES)],
                       blocked_paths=[str(ROOT / "ckpts")], **kwargs)
