"""The virtual try-on tab: person + garment, the mask editor, and the ``/tryon`` endpoint."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from engine import registry
from engine.options import GenerateOptions, OptionCheck, OptionLimits, ResultView
from engine.outfit import Garment, TryOnSample, check_outfit
from engine.registry import Task
from engine.service import Engine
from errors import OptionError, UserError
from preprocess.images import fit_label_image, fit_to_canvas, load_image
from preprocess.masks import GarmentType, TryOnModel
from webapp.components import (FOCUS_PARAMETERS, GENERATION_PARAMETERS, MODEL_SLOT, SAMPLING_PARAMETERS, Sample,
                               TabParts,
                               attention_panel, chosen_result, framing_preview, generation_options, input_row,
                               intermediate, need, notice_tab, reporter, result_outputs, say_who_was_framed,
                               stop_requested, tab_limits, task_notice, upload_path, user_errors, wire_generation)

MASK_COLOUR = (255, 0, 255)
TRYON_HELP = """Upload a person and a garment, check the mask (paint to add, erase to remove), then **Generate**.
To see where a point of the result looked in the garment, tick *Record attention maps* (advanced options)
before generating, then click the result. Add a second garment for an outfit; ask for several samples to choose from;
pass the chosen result on with *Use as person* (another garment) or *Send to pose transfer*."""
OUTFIT_HELP = ("Put on after the first garment, masked on its result. Each garment goes to the model trained on "
               "its type (VITON-HD: upper body; DressCode: upper, lower, dresses). An upper and a lower garment; "
               "a dress alone.")


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
    view: ResultView  # the photo (default), the framed picture, or the canvas
    garment2: str | None = None  # an outfit's second garment, put on after the first
    garment2_type: GarmentType = GarmentType.LOWER_BODY

    @classmethod
    def from_values(cls, values: dict[str, Any], limits: OptionLimits) -> TryOnRequest:
        """From the event's values by parameter name (``TRYON_PARAMETERS``): a missing or
        incomplete upload is a message; so is every option of a wrong type or out of ``limits``."""
        uploads = (need(values["person"], "person photo"), need(values["garment"], "garment photo"),
                   values["editor"] or None, upload_path(values["mask_upload"], "mask"),
                   upload_path(values["densepose_upload"], "DensePose image"))
        with OptionCheck() as check:
            choices = (check.choice("model_type", TryOnModel, values["model_type"]),
                       check.choice("garment_type", GarmentType, values["garment_type"]),
                       check.flag("preprocess_garment", values["preprocess_garment"]),
                       check.flag("keep_fixed", values["keep_fixed"]))
            options = limits.options(values, check)
            view = check.choice("result", ResultView, values.get("result", ResultView.PHOTO.value))  # appended last
            garment2 = upload_path(values.get("garment2"), "second garment photo")
            garment2_type = check.choice("garment2_type", GarmentType,
                                         values.get("garment2_type") or GarmentType.LOWER_BODY.value)
            if garment2 is not None and not check.problems:
                try:
                    check_outfit([choices[1], garment2_type], what="garment (garment2_type)")
                except OptionError as e:
                    check.problems.append(str(e))
        return cls(*uploads, *choices, options, view, garment2, garment2_type)

    @property
    def garments(self) -> list[Garment]:
        """The garments, in the order they are put on."""
        pieces = [(self.garment, self.garment_type)] + ([(self.garment2, self.garment2_type)] if self.garment2 else [])
        return [Garment(image, kind, self.preprocess_garment) for image, kind in pieces]


# the later additions last, so that the parameters before keep their positions
TRYON_PARAMETERS = ("person", "garment", "editor", "mask_upload", "densepose_upload", "model_type", "garment_type",
                    *GENERATION_PARAMETERS, "repaint", "preprocess_garment", "keep_fixed", "record",
                    *FOCUS_PARAMETERS, "result", "samples", "garment2", "garment2_type", *SAMPLING_PARAMETERS)
CHAINS = (("use-person", "Use as person"), ("to-pose", "Send to pose transfer"))
RESULT_CHOICES = [("Your photo, at its own size (the garment blended in)", ResultView.PHOTO.value),
                  ("The model's 768×1024 picture, framed around the person", ResultView.FRAMED.value),
                  ("The whole photo fitted onto 768×1024 (as the original app)", ResultView.CANVAS.value)]


@user_errors
def compute_mask(engine: Engine, person, model_type, garment_type, keep_fixed, result, mask_upload, densepose_upload):
    """The automatic mask of what the model will see (the photo framed around the person, for the
    photo and framed results, unless a mask or DensePose image made for the whole photo is
    uploaded), in the editor, which shows once there is a person; with the parsing and keypoints it
    came from, and the box chosen on the photo."""
    person = upload_path(person, "person photo")
    if person is None:
        return gr.update(value=None), None, None, None, gr.update(visible=False)
    with OptionCheck() as check:
        choices = (check.choice("model_type", TryOnModel, model_type),
                   check.choice("garment_type", GarmentType, garment_type), check.flag("keep_fixed", keep_fixed),
                   check.choice("result", ResultView, result))
    model_type, garment_type, keep_fixed, view = choices
    whole = upload_path(mask_upload, "mask") is not None or upload_path(densepose_upload, "DensePose image") is not None
    pm = engine.person_mask(person, model_type, garment_type, keep_fixed_regions=keep_fixed,
                            view=ResultView.CANVAS if whole else view)
    return (editor_value(pm.person, pm.mask), pm.parsing.image, pm.pose_image, framing_preview(pm.framing),
            gr.update(visible=True))


@user_errors
def photo_without_strokes(person, editor=None):
    """The mask editor with its strokes cleared: the picture it shows (the person photo as the
    automatic mask showed it: framed, or fitted whole), with an empty layer to paint on."""
    person = upload_path(person, "person photo")
    if person is None:
        return None
    background = upload_path((editor or {}).get("background"), "mask editor's picture")
    photo = fit_to_canvas(load_image(background or person, name="person image"))
    return editor_value(photo, Image.new("L", photo.size))


@user_errors
def tryon(engine: Engine, progress=gr.Progress(track_tqdm=True), *, garment2=None, **values):
    """``/tryon``: ``values`` are named by ``TRYON_PARAMETERS``. ``garment2`` is named here, with its
    default, so that API clients written before outfits existed may leave it out (Gradio makes a
    parameter optional when its component has a value or its argument defaults to None)."""
    request = TryOnRequest.from_values({**values, "garment2": garment2}, tab_limits(engine, Task.TRYON))
    should_stop = stop_requested()
    progress(0.0, desc="Preprocessing the photos")
    # an uploaded mask or DensePose image was made for the whole photo: then the engine fits it whole
    # (as the mask editor did, compute_mask), else it frames the photo around the person
    edited = None if request.mask_upload is not None else mask_from_editor(request.editor)
    result = engine.tryon(request.person, request.garments, request.model_type, request.options,
                          keep_fixed_regions=request.keep_fixed, densepose=request.densepose_upload,
                          mask=request.mask_upload, edited_mask=edited, view=request.view,
                          progress=reporter(progress), should_stop=should_stop)
    framing, first = result.framing, result.samples[0].passes[0].inputs
    say_who_was_framed(framing)
    photo_shown = request.view is ResultView.PHOTO and framing is not None  # clicks map through the box
    samples = [Sample(s.answer, s.generation, later_pass_pictures(s)) for s in result.samples]
    answer, seed, state, group, step, gallery = result_outputs(samples, framing.box if photo_shown else None)
    return (answer, seed, first.parsing, first.pose_image, first.mask, first.densepose, state, group, step,
            framing_preview(framing), gallery, gr.update(visible=len(request.garments) > 1), *samples[0].pictures)


def later_pass_pictures(sample: TryOnSample) -> tuple:
    """The second garment's parsing, mask and DensePose image of a sample (None each: one garment)."""
    if len(sample.passes) < 2:
        return None, None, None
    later = sample.passes[1].inputs
    return later.parsing, later.mask, later.densepose


def build_tryon_tab(engine: Engine) -> TabParts:
    """The tab; returns its person upload and result column (the demo wires the chains across tabs)."""
    with gr.Tab("Virtual try-on", id="tryon"):
        gr.Markdown(TRYON_HELP)
        notice_tab(task_notice(engine, Task.TRYON), "tryon-weights")
        c = {}
        (c["person"], c["garment"]), column = input_row(
            "tryon", ("Person", "person", "person"), ("Garment", "garment", "garment"), chains=CHAINS)
        state = column.state
        with gr.Accordion("Outfit: a second garment, put on after the first", open=False):
            with gr.Row():
                c["garment2"] = gr.Image(label="Second garment (optional)", type="filepath", height=260,
                                         elem_id="tryon-garment2")
                c["garment2_type"] = gr.Radio([(g.label, g.value) for g in GarmentType],
                                              value=GarmentType.LOWER_BODY.value, label="Second garment type",
                                              info=OUTFIT_HELP)
        with gr.Accordion("Mask and DensePose", open=True), gr.Row():
            with gr.Column(visible=False) as mask_editor:  # shown once there is a person; the uploads stay
                c["editor"] = gr.ImageEditor(
                    label="Mask: paint to add, erase to remove (magenta = replaced)", type="pil",
                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"), eraser=gr.Eraser(), sources=(),
                    transforms=(), height=520, elem_id="tryon-mask-editor",
                    format="png")  # lossless: 'Clear mask' puts back exactly the picture it showed
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
                [(e.mask_variant.label, e.mask_variant.value) for e in registry.for_task(Task.TRYON)],
                value=registry.default_for(Task.TRYON).mask_variant.value, label="Model type")
            c["garment_type"] = gr.Radio(
                [(g.label, g.value) for g in GarmentType], value=GarmentType.UPPER_BODY.value, label="Garment type")
            c["preprocess_garment"] = gr.Checkbox(False, label="Garment is a PNG cut-out (crop to its transparency)")
            c["keep_fixed"] = gr.Checkbox(False, label="Never mask other clothes, shoes and hands (full-body photos)")
            c["result"] = gr.Radio(RESULT_CHOICES, value=ResultView.PHOTO.value, label="Result")
            c.update(generation_options(tab_limits(engine, Task.TRYON), with_repaint=True))
        with gr.Accordion("Intermediate results", open=False) as intermediates:
            with gr.Row():
                framing = intermediate("Framing: the box of your photo the model sees", "tryon-framing")
                parsing, keypoints = intermediate("Human parsing"), intermediate("Keypoints")
                mask_used, densepose = intermediate("Mask used"), intermediate("DensePose")
            with gr.Row(visible=False) as second_row:  # an outfit's second garment: on the chosen sample
                second = (intermediate("Second garment: human parsing of the first one's result"),
                          intermediate("Second garment: mask used", "tryon-mask2"),
                          intermediate("Second garment: DensePose"))
        group, step = attention_panel(column.image, state, "garment")

    mask_inputs = [c[name] for name in ("person", "model_type", "garment_type", "keep_fixed", "result", "mask_upload",
                                        "densepose_upload")]
    mask_handler = functools.partial(compute_mask, engine)  # one handler: one concurrency group
    for trigger in [*(component.change for component in mask_inputs), recompute.click]:
        trigger(mask_handler, mask_inputs, [c["editor"], parsing, keypoints, framing, mask_editor],
                api_name="compute_mask", api_visibility="private", preprocess=False, concurrency_id=MODEL_SLOT)
    clear.click(photo_without_strokes, [c["person"], c["editor"]], c["editor"], api_visibility="private",
                preprocess=False)
    wire_generation(column, functools.partial(tryon, engine), {name: c[name] for name in TRYON_PARAMETERS},
                    [parsing, keypoints, mask_used, densepose, state, group, step, framing, column.gallery,
                     second_row, *second], "tryon", intermediates, sample_pictures=second)
    column.chains["use-person"].click(chosen_result, state, c["person"], api_visibility="private")
    return TabParts(c["person"], column)
