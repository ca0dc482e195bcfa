"""The Gradio UI: ``create_demo(predictor)`` builds it, ``launch(demo, settings)`` serves it.

The event handlers are module-level functions that take the predictor explicitly (bound with
``functools.partial``); the two generation endpoints receive their values by parameter name and pack
them into a request (``TryOnRequest``, ``PoseRequest``) first, which checks every value (the events run
with ``preprocess=False``: API callers' values arrive as sent). One builder per tab lays out its
components and wires its events; option ranges come from ``predictor.limits``."""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from errors import UserError
from leffa import ModelKind
from leffa.pipeline import GenerationStopped
from preprocess.images import MODEL_SIZE, fit_label_image, fit_to_canvas, load_image, load_label_image
from preprocess.masks import GarmentType, TryOnModel
from preprocess.openpose import NoPersonError
from webapp.attention_view import heatmap_overlay, layer_groups, mark_point, warped_reference, with_colour_legend
from webapp.predict import (GenerateOptions, Generation, OptionCheck, OptionLimits, Predictor, Progress,
                            ShouldStop, free_accelerator_memory, never_stop)
from weightfiles.manifest import WeightSet, download_size

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MASK_COLOUR = (255, 0, 255)
# every event that runs a model (preprocessing or generation) shares one slot: one at a time in all
MODEL_SLOT = "model"
# uploads and results in Gradio's cache: checked every hour, deleted when older than a day
UPLOAD_CACHE_LIFETIME = (3600, 86400)

# displayed heights (pixels) of the attention pictures and the intermediate results
ATTENTION_HEIGHT, INTERMEDIATE_HEIGHT = 380, 300
# an error toast goes after this many seconds, unless it has more characters than this (or several
# lines): then it stays until closed
TOAST_SECONDS, SHORT_MESSAGE = 10, 100
# Gradio renders a toast's message as HTML: keep its line breaks and indented commands as written.
# The mask editor's own 'Clear canvas' (the last button of its toolbar) drops the photo too, and in
# Gradio 6.31 a value sent back after it does not show: hidden, our 'Clear mask' keeps the photo.
PAGE_CSS = """.toast-message-text { white-space: pre-wrap; }
#tryon-mask-editor .top-panel > button:last-of-type { display: none; }"""

TITLE = """# Leffa: virtual try-on and pose transfer
Re-implementation of *Learning Flow Fields in Attention for Controllable Person Image Generation*
(Zhou et al., CVPR 2025)"""
PUBLISHED_WEIGHTS = " with the authors' published weights."
TINY_BANNER = """> ⚠️ **Offline demo mode (`--tiny`)**: a tiny **untrained** model with random weights and
> stand-in preprocessing, not the published weights. Everything runs, but the pictures are noise. Start without
> `--tiny` for the real models."""
TRYON_HELP = """Upload a person and a garment, check the mask (paint to add, erase to remove), then **Generate**.
To see where a point of the result looked in the garment, tick *Record attention maps* (advanced options)
before generating, then click the result."""
POSE_HELP = """Upload the person to keep and a person in the target pose (or, in the advanced options, the
target's DensePose IUV image), then **Generate**. To see where a point of the result looked in the person,
tick *Record attention maps* (advanced options) before generating, then click the result."""
# what to do when DensePose finds nobody in the target photo: this tab's own upload field
POSE_DENSEPOSE_HINT = ("Use a photo of one person in the target pose, or upload its DensePose IUV image under "
                       "'Advanced options' on this tab.")


def weights_notice(predictor: Predictor, weight_set: WeightSet, also: WeightSet | None = None) -> str:
    """A tab's notice while weights it needs are not on the server yet (empty once they are):
    which, and how much is downloaded on first use. ``also``: a choice on the tab that needs
    more (the DressCode model on the try-on tab)."""
    missing = predictor.missing_weights(weight_set)
    extra = [f for f in predictor.missing_weights(also) if f not in missing] if also is not None else []
    if not missing and not extra:
        return ""
    lines = []
    if missing:
        lines.append(f"⏬ Not on this server yet: {', '.join(f'`{f}`' for f in missing)} (about "
                     f"{download_size(missing)}). They are downloaded on first use, "
                     "so the first generation takes longer.")
    if extra:
        lines.append(f"The {also.value} model ({', '.join(f'`{f}`' for f in extra)}, about "
                     f"{download_size(extra)}) is downloaded when first chosen.")
    return "> " + "\n> ".join(lines)


def notice_tab(notice: str, elem_id: str) -> None:
    """The weights notice on a tab, only when there is one (no empty component on the page)."""
    if notice:
        gr.Markdown(notice, elem_id=elem_id)


def header(tiny: bool) -> str:
    """The page's title and what it is; the published weights only where they are used."""
    return TITLE + ("." if tiny else PUBLISHED_WEIGHTS)


def toast(message: str) -> gr.Error:
    """A message for the page: shown as written (HTML characters escaped; line breaks kept by
    ``PAGE_CSS``); a long one stays until closed."""
    duration = None if len(message) > SHORT_MESSAGE or "\n" in message else TOAST_SECONDS
    return gr.Error(html.escape(message, quote=False), duration=duration, print_exception=False)


def user_errors(fn):
    """Turn the failures a user can act on into error toasts; the app keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            free_accelerator_memory()
            raise toast("Out of GPU memory. Try again with fewer steps or without attention recording; "
                        "the server keeps running.") from None
        except GenerationStopped:  # Stop pressed or the client gone: no one waits for this answer
            raise gr.Error("Stopped.", print_exception=False) from None
        except UserError as e:  # anything else is a bug: Gradio shows an error and logs the traceback
            raise toast(str(e)) from None

    return wrapper


def upload_path(payload, what: str) -> str | None:
    """The cached file of an upload (events run with preprocess=False, so that our own loader,
    not Gradio's, reads every upload and reports bad files clearly)."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else payload
    if not isinstance(path, str) or not path:
        raise UserError(f"The {what} did not arrive completely; upload it again.")
    return path


def _need(payload, what: str) -> str:
    path = upload_path(payload, what)
    if path is None:
        raise UserError(f"Upload {what} first.")
    return path


def editor_value(person: Image.Image, mask: Image.Image) -> dict:
    """The mask as a paintable layer over the person."""
    layer = np.zeros((mask.height, mask.width, 4), np.uint8)
    on = np.asarray(mask) > 0
    layer[on] = (*MASK_COLOUR, 160)
    return {"background": person, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}


def mask_from_editor(value) -> Image.Image | None:
    """The union of the painted layers (None when the editor holds no layer)."""
    if not value or not value.get("layers"):  # Gradio checked its shape (EditorData) before the handler
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
        raise UserError("The mask is empty: paint the region to replace, or press 'Recompute mask'.")
    mask = Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")
    return fit_label_image(mask)


def _examples(folder: str) -> list[str]:
    return sorted(str(p) for p in (EXAMPLES / folder).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))


# -- requests: what an event's values mean -----------------------------------------------------------
@dataclass(frozen=True)
class TryOnRequest:
    """One ``/tryon`` request: the uploads as cached files, the choices and the generation options."""

    person: str
    garment: str
    editor: dict | None  # the mask editor's value: the painted layers over the person
    mask_upload: str | None  # an uploaded mask: overrides the editor
    densepose_upload: str | None  # an uploaded DensePose image: replaces the computed one
    model_type: TryOnModel
    garment_type: GarmentType
    preprocess_garment: bool  # the garment is a PNG cut-out
    keep_fixed: bool  # never mask other clothes, shoes and hands
    options: GenerateOptions

    @classmethod
    def from_values(cls, values: dict[str, Any], limits: OptionLimits) -> TryOnRequest:
        """From the event's values by parameter name (``TRYON_PARAMETERS``): a missing or
        incomplete upload is a message; so is every option of a wrong type or out of ``limits``."""
        uploads = (_need(values["person"], "a person photo"), _need(values["garment"], "a garment photo"),
                   values["editor"] or None, upload_path(values["mask_upload"], "mask"),
                   upload_path(values["densepose_upload"], "DensePose image"))
        with OptionCheck() as check:
            choices = (check.choice("model_type", TryOnModel, values["model_type"]),
                       check.choice("garment_type", GarmentType, values["garment_type"]),
                       check.flag("preprocess_garment", values["preprocess_garment"]),
                       check.flag("keep_fixed", values["keep_fixed"]))
            options = limits.options(values, check)
        return cls(*uploads, *choices, options)

    @property
    def kind(self) -> ModelKind:
        return ModelKind(self.model_type.weights)


@dataclass(frozen=True)
class PoseRequest:
    """One ``/pose_transfer`` request: the person to keep, the target pose (a photo, its DensePose
    image, or both) and the generation options."""

    person: str
    target: str | None
    densepose_upload: str | None
    options: GenerateOptions

    @classmethod
    def from_values(cls, values: dict[str, Any], limits: OptionLimits) -> PoseRequest:
        """From the event's values by parameter name (``POSE_PARAMETERS``), checked as ``TryOnRequest``'s."""
        person = _need(values["person"], "a photo of the person to keep")
        target = upload_path(values["target"], "target-pose photo")
        densepose_upload = upload_path(values["densepose_upload"], "DensePose image")
        if target is None and densepose_upload is None:
            raise UserError("Upload a photo in the target pose (or its DensePose image) first.")
        with OptionCheck() as check:
            options = limits.options(values, check)
        return cls(person, target, densepose_upload, options)


# The endpoints' parameters, in their order (the API's; README documents it): each tab's builder
# wires its components to these names, and the handler receives them by name.
GENERATION_PARAMETERS = ("steps", "guidance", "seed", "random_seed", "ref_acceleration")
# the experimental attention focus: last, so that the parameters before keep their positions
FOCUS_PARAMETERS = ("focus", "focus_levels", "focus_start", "focus_end")
TRYON_PARAMETERS = ("person", "garment", "editor", "mask_upload", "densepose_upload", "model_type", "garment_type",
                    *GENERATION_PARAMETERS, "repaint", "preprocess_garment", "keep_fixed", "record",
                    *FOCUS_PARAMETERS)
POSE_PARAMETERS = ("person", "target", "densepose_upload", *GENERATION_PARAMETERS, "record", *FOCUS_PARAMETERS)


# -- handlers: module-level, the predictor bound with functools.partial -------------------------------
# The generation handlers get their values as keywords (the events' ``inputs_kwargs``; the API keeps
# these names and order). ``progress`` stays the one positional parameter: Gradio injects gr.Progress
# only into a positional slot.
def _reporter(progress) -> Progress:
    return lambda fraction, desc: progress(fraction, desc=desc)


def stop_requested() -> ShouldStop:
    """Whether Gradio still waits for the running event's answer, to ask between denoising steps.

    A synchronous handler runs in a worker thread that nothing stops: when Stop is pressed (or an
    API client cancels), ``/cancel`` cancels the event's task, which drops the event from the queue's
    ``event_ids_to_events`` and frees its concurrency slot at once; when the client disconnects, the
    queue marks the event not ``alive``. Either way the thread goes on unless it checks this. Gradio's
    own ``gr.Progress`` finds the running event the same way (``LocalContext``). Outside a queued
    event (a direct call) nothing asks to stop."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    event = queue.event_ids_to_events.get(event_id) if queue is not None and event_id else None
    if event is None:
        return never_stop
    return lambda: not event.alive or queue.event_ids_to_events.get(event_id) is not event


def _attention_outputs(gen: Generation):
    """(state, layer-group dropdown, step dropdown) after a generation. The steps are listed
    1-based as the progress counts them ("2/4": after the second of four steps); their values are
    the recorder's 0-based step indices."""
    if gen.recorder is None:
        return None, gr.update(choices=[], value=None), gr.update(choices=[], value=None)
    groups = list(layer_groups(gen.recorder))
    steps = [(f"{step + 1}/{gen.steps}", step) for step in gen.recorder.steps()]
    return gen, gr.update(choices=groups, value=groups[0]), gr.update(choices=steps, value=steps[-1][1])


@user_errors
def compute_mask(predictor: Predictor, person, model_type, garment_type, keep_fixed):
    """The automatic mask, in the editor, with the parsing and keypoints it came from."""
    person = upload_path(person, "person photo")
    if person is None:
        return None, None, None
    with OptionCheck() as check:
        choices = (check.choice("model_type", TryOnModel, model_type),
                   check.choice("garment_type", GarmentType, garment_type), check.flag("keep_fixed", keep_fixed))
    model_type, garment_type, keep_fixed = choices
    pm = predictor.person_mask(person, model_type, garment_type, keep_fixed_regions=keep_fixed)
    return editor_value(pm.person, pm.mask), pm.parsing.image, pm.pose_image


@user_errors
def photo_without_strokes(person):
    """The mask editor with its strokes cleared: the person photo as the automatic mask showed
    it, with an empty layer to paint on."""
    person = upload_path(person, "person photo")
    if person is None:
        return None
    photo = fit_to_canvas(load_image(person, name="person image"))
    return editor_value(photo, Image.new("L", photo.size))


@user_errors
def tryon(predictor: Predictor, progress=gr.Progress(track_tqdm=True), **values):
    """``/tryon``: ``values`` are named by ``TRYON_PARAMETERS``."""
    request = TryOnRequest.from_values(values, predictor.limits)  # before the slow part
    should_stop = stop_requested()
    progress(0.0, desc="Preprocessing the photos")
    inputs = predictor.tryon_inputs(request.person, request.garment, request.model_type, request.garment_type,
                                    request.preprocess_garment, request.keep_fixed, densepose=request.densepose_upload)
    if request.mask_upload is not None:
        mask = load_label_image(request.mask_upload, "uploaded mask", binary=True)
    else:
        mask = mask_from_editor(request.editor) or inputs.mask
    gen = predictor.generate(request.kind, inputs.person, inputs.garment, mask, inputs.densepose, request.options,
                             _reporter(progress), should_stop)
    return (gen.image, gen.seed, inputs.parsing, inputs.pose_image, mask, inputs.densepose, *_attention_outputs(gen))


@user_errors
def pose_transfer(predictor: Predictor, progress=gr.Progress(track_tqdm=True), **values):
    """``/pose_transfer``: ``values`` are named by ``POSE_PARAMETERS``."""
    request = PoseRequest.from_values(values, predictor.limits)
    should_stop = stop_requested()
    progress(0.0, desc="Preprocessing the photos")
    target = request.target or Image.new("RGB", MODEL_SIZE, "white")  # without a photo only its DensePose is used
    try:
        inputs = predictor.pose_inputs(request.person, target, densepose=request.densepose_upload)
    except NoPersonError as e:  # only the target photo is analysed (by DensePose)
        raise NoPersonError(f"{str(e).rstrip('.')}.\n{POSE_DENSEPOSE_HINT}") from None
    gen = predictor.generate(ModelKind.POSE_TRANSFER, inputs.target, inputs.reference, inputs.mask, inputs.densepose,
                             request.options, _reporter(progress), should_stop)
    return (gen.image, gen.seed, inputs.densepose, *_attention_outputs(gen))


def _recorded(state: Generation | None) -> Generation:
    if state is None or state.recorder is None:
        raise UserError("Turn on 'Record attention maps' in the advanced options and generate first.")
    return state


@user_errors
def show_attention(state: Generation | None, group, step, evt: gr.SelectData):
    """The clicked point marked on a copy of the result, and the heatmap (with its colour legend)
    of where it looked in the reference."""
    state = _recorded(state)
    x, y = evt.index
    w, h = state.image.size
    point = (min(max(x / w, 0.0), 1.0), min(max(y / h, 0.0), 1.0))
    heat = heatmap_overlay(state.recorder, int(step), layer_groups(state.recorder)[group], point, state.reference)
    return mark_point(state.image, point), with_colour_legend(heat)


@user_errors
def warp(state: Generation | None, group, step):
    """The reference warped by the attention flow."""
    state = _recorded(state)
    return warped_reference(state.recorder, int(step), layer_groups(state.recorder)[group], state.reference)


FOCUS_HELP = ("Divides the attention logits over the garment (or the kept person) by τ in the finest layers, "
              "at inference, without retraining. Off by default: on our toy it did not replace the Leffa loss "
              "(see the README's *Attention focus*).")


# -- layout: shared parts, one builder per tab, the demo --------------------------------------------
def generation_options(limits: OptionLimits, with_repaint: bool) -> dict[str, gr.components.Component]:
    """The generation option components, by endpoint parameter name; ranges from ``limits``."""
    c = {"steps": gr.Slider(limits.steps_min, limits.steps_max, value=limits.steps_default, step=1, label="Steps"),
         "guidance": gr.Slider(limits.guidance_min, limits.guidance_max, value=limits.guidance_default, step=0.1,
                               label="Guidance scale")}
    with gr.Row():
        c["seed"] = gr.Number(limits.seed_default, precision=0, minimum=0, maximum=limits.seed_max, label="Seed")
        c["random_seed"] = gr.Checkbox(False, label="Random seed")
    c["ref_acceleration"] = gr.Checkbox(False, label="Reference acceleration (~30% faster, may slightly reduce quality)")
    if with_repaint:
        c["repaint"] = gr.Checkbox(False, label="Repaint (keep the person's pixels outside the mask)")
    c["record"] = gr.Checkbox(False, label="Record attention maps (slower; enables the attention panel)")
    with gr.Accordion("Experimental: attention focus", open=False):
        c["focus"] = gr.Slider(limits.focus_min, limits.focus_max, value=1.0, step=0.05,
                               label="Focus temperature τ (1 = off; < 1 sharpens)", info=FOCUS_HELP)
        c["focus_levels"] = gr.Slider(1, limits.focus_levels_max, value=1, step=1,
                                      label="Token-grid levels focused, from the finest")
        with gr.Row():
            c["focus_start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="From (fraction of the steps)")
            c["focus_end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Until")
    return c


@dataclass(frozen=True)
class ResultColumn:
    """The result of a tab and what runs it."""

    image: gr.Image
    seed_used: gr.Number  # hidden until a generation has reported its seed
    run: gr.Button
    stop: gr.Button


def input_row(prefix: str, *uploads_spec: tuple[str, str, str]) -> tuple[list[gr.Image], ResultColumn]:
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
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate", scale=3)
                stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop", scale=1)
            seed_used = gr.Number(label="Seed used", interactive=False, precision=0, visible=False,
                                  elem_id=f"{prefix}-seed")
    return uploads, ResultColumn(result, seed_used, run, stop)


def wire_generation(column: ResultColumn, handler, inputs: dict[str, gr.components.Component], outputs: list,
                    api_name: str) -> None:
    """``column.run`` runs ``handler`` (in the one model slot); ``column.stop`` cancels it (the
    handler stops at its next denoising step); the seed shows once one is reported."""
    event = column.run.click(handler, inputs_kwargs=inputs, outputs=[column.image, column.seed_used, *outputs],
                             api_name=api_name, api_description=False, preprocess=False, concurrency_id=MODEL_SLOT)
    event.success(_reveal, None, column.seed_used, queue=False, api_visibility="private")
    column.stop.click(None, cancels=[event])


def _reveal():
    return gr.update(visible=True)


def attention_panel(result: gr.Image, state, what: str):
    """The attention-map accordion under a result; returns its (layer group, step) dropdowns.
    Clicking the result, or its copy here, marks the point on the copy and shows its heatmap."""
    with gr.Accordion("Attention maps", open=False):
        gr.Markdown(f"Click a point on the result: the heatmap shows where it looked in the {what} "
                    "(averaged over the heads and the layers of one token grid; colours from low to high "
                    "as the scale under it).")
        with gr.Row():
            group = gr.Dropdown(label="Layer group (token grid)", choices=[], interactive=True)
            step = gr.Dropdown(label="After denoising step", choices=[], interactive=True)
        with gr.Row():
            point = gr.Image(label="The point (click to choose another)", interactive=False, type="pil",
                             height=ATTENTION_HEIGHT, elem_id=f"point-{what}")
            heat = gr.Image(label=f"Where the point looked in the {what}", interactive=False, type="pil",
                            height=ATTENTION_HEIGHT, elem_id=f"heatmap-{what}")
            warped = gr.Image(label=f"The {what} warped by the attention flow", interactive=False, type="pil",
                              height=ATTENTION_HEIGHT, elem_id=f"warped-{what}")
        warp_button = gr.Button(f"Warp the {what} by the attention flow", elem_id=f"warp-{what}")
    for clickable in (result, point):
        clickable.select(show_attention, [state, group, step], [point, heat], api_visibility="private")
    warp_button.click(warp, [state, group, step], warped, api_visibility="private")
    return group, step


def _intermediate(label: str, elem_id: str | None = None) -> gr.Image:
    return gr.Image(label=label, interactive=False, type="pil", format="png", height=INTERMEDIATE_HEIGHT,
                    elem_id=elem_id)


def build_tryon_tab(predictor: Predictor) -> None:
    with gr.Tab("Virtual try-on", id="tryon"):
        gr.Markdown(TRYON_HELP)
        notice_tab(weights_notice(predictor, WeightSet.TRYON, WeightSet.TRYON_DC), "tryon-weights")
        state = gr.State(None)
        c = {}
        (c["person"], c["garment"]), column = input_row(
            "tryon", ("Person", "person", "person"), ("Garment", "garment", "garment"))
        with gr.Accordion("Mask and DensePose", open=True), gr.Row():
            c["editor"] = gr.ImageEditor(label="Mask: paint to add, erase to remove (magenta = replaced)", type="pil",
                                         brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"), eraser=gr.Eraser(),
                                         sources=(), transforms=(), height=520, elem_id="tryon-mask-editor")
            with gr.Column():
                with gr.Row():
                    recompute = gr.Button("Recompute mask")
                    clear = gr.Button("Clear mask (keep the photo)", elem_id="tryon-clear-mask")
                c["mask_upload"] = gr.Image(label="…or upload a mask (white = replace); overrides the editor",
                                            type="filepath")
                c["densepose_upload"] = gr.Image(label="DensePose image (optional: replaces the computed one)",
                                                 type="filepath")
        with gr.Accordion("Advanced options", open=False):
            c["model_type"] = gr.Radio(
                [(m.label, m.value) for m in TryOnModel], value=TryOnModel.VITON_HD.value, label="Model type")
            c["garment_type"] = gr.Radio(
                [(g.label, g.value) for g in GarmentType], value=GarmentType.UPPER_BODY.value, label="Garment type")
            c["preprocess_garment"] = gr.Checkbox(False, label="Garment is a PNG cut-out (crop to its transparency)")
            c["keep_fixed"] = gr.Checkbox(False, label="Never mask other clothes, shoes and hands (full-body photos)")
            c.update(generation_options(predictor.limits, with_repaint=True))
        with gr.Accordion("Intermediate results", open=False), gr.Row():
            parsing, keypoints = _intermediate("Human parsing"), _intermediate("Keypoints")
            mask_used, densepose = _intermediate("Mask used"), _intermediate("DensePose")
        group, step = attention_panel(column.image, state, "garment")

    mask_inputs = [c[name] for name in ("person", "model_type", "garment_type", "keep_fixed")]
    mask_handler = functools.partial(compute_mask, predictor)  # one handler: one concurrency group
    for trigger in [*(component.change for component in mask_inputs), recompute.click]:
        trigger(mask_handler, mask_inputs, [c["editor"], parsing, keypoints], api_name="compute_mask",
                api_visibility="private", preprocess=False, concurrency_id=MODEL_SLOT)
    clear.click(photo_without_strokes, c["person"], c["editor"], api_visibility="private", preprocess=False)
    wire_generation(column, functools.partial(tryon, predictor), {name: c[name] for name in TRYON_PARAMETERS},
                    [parsing, keypoints, mask_used, densepose, state, group, step], "tryon")


def build_pose_tab(predictor: Predictor) -> None:
    with gr.Tab("Pose transfer", id="pose"):
        gr.Markdown(POSE_HELP)
        notice_tab(weights_notice(predictor, WeightSet.POSE), "pose-weights")
        state = gr.State(None)
        c = {}
        (c["person"], c["target"]), column = input_row(
            "pose", ("Person to keep", "person", "person"), ("Person in the target pose", "pose", "target"))
        with gr.Accordion("Advanced options", open=False):
            c["densepose_upload"] = gr.Image(label="DensePose IUV image of the target pose (optional: replaces the "
                                                   "computed one)", type="filepath")
            c.update(generation_options(predictor.limits, with_repaint=False))
        with gr.Accordion("Intermediate results", open=False):
            densepose = _intermediate("DensePose IUV of the target", "pose-densepose")
        group, step = attention_panel(column.image, state, "person")
    wire_generation(column, functools.partial(pose_transfer, predictor),
                    {name: c[name] for name in POSE_PARAMETERS}, [densepose, state, group, step], "pose_transfer")


def create_demo(predictor: Predictor) -> gr.Blocks:
    """The app: a tab per task; option ranges from ``predictor.limits``."""
    with gr.Blocks(title="Leffa: virtual try-on and pose transfer", delete_cache=UPLOAD_CACHE_LIFETIME) as demo:
        gr.Markdown(header(predictor.tiny))
        if predictor.tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        build_tryon_tab(predictor)
        build_pose_tab(predictor)
    return demo


def launch(demo: gr.Blocks, settings, **kwargs):
    """Serve with one generation at a time, a bounded queue and bounded uploads."""
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                       max_file_size=settings.max_file_size, allowed_paths=[str(EXAMPLES)],
                       blocked_paths=[str(ROOT / "ckpts")], css=PAGE_CSS, **kwargs)
