"""The pose transfer tab: the person to keep + a person in the target pose, and the
``/pose_transfer`` endpoint."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from engine import registry
from engine.inputs import needs_appearance
from engine.options import MODEL_SAMPLER, GenerateOptions, OptionCheck, OptionLimits, ResultView
from engine.registry import Task
from engine.service import Engine
from errors import UserError
from preprocess.framing import Box, box_drawn
from preprocess.inputs import PoseInputs
from preprocess.openpose import NoPersonError
from webapp.components import (FOCUS_PARAMETERS, GENERATION_PARAMETERS, INTERMEDIATE_HEIGHT, SAMPLING_PARAMETERS,
                               Sample, TabParts,
                               attention_panel, chosen_result, framing_preview, generation_options, input_row,
                               intermediate, need, notice_tab, reporter, result_outputs, say_who_was_framed,
                               stop_requested, tab_limits, task_notice, upload_path, user_errors, wire_generation)

POSE_HELP = """Upload the person to keep and a person in the target pose (or, under the photos, the target's
DensePose IUV image), then **Generate**. To see where a point of the result looked in the person, tick
*Record attention maps* (advanced options) before generating, then click the result. Ask for several samples to
choose from; pass the chosen result on with *Use as person to keep* or *Send to try-on*."""
MODEL_HELP = ("Leffa keeps the person through attention to the photo; MCLD (SD1.5-sized, less memory) through "
              "a texture map of the body and the identity of the face.")
# what to do when DensePose finds nobody in the target photo: this tab's own upload field
POSE_DENSEPOSE_HINT = ("Use a photo of one person in the target pose, or upload its DensePose IUV image under "
                       "the photos on this tab.")
RESULT_CHOICES = [("The model's picture, both photos framed around their people", ResultView.FRAMED.value),
                  ("Each photo fitted whole onto the model's picture (768×1024 for Leffa, as the original app)",
                   ResultView.CANVAS.value)]
MODEL_CHOICES = [(e.label, e.name) for e in registry.for_task(Task.POSE)]


@dataclass(frozen=True)
class PoseRequest:
    """One ``/pose_transfer`` request: the person to keep, the target pose (a photo, its DensePose
    image, or both) and the generation options."""

    person: str
    target: str | None
    densepose_upload: str | None
    options: GenerateOptions
    view: ResultView  # framed (default) or canvas
    model: registry.ModelEntry  # a pose-transfer entry

    @classmethod
    def from_values(cls, values: dict[str, Any], limits_for: Callable[[registry.ModelEntry], OptionLimits]
                    ) -> PoseRequest:
        """From the event's values by parameter name (``POSE_PARAMETERS``), checked as ``TryOnRequest``'s,
        the options against the chosen model's limits (``limits_for``)."""
        model = registry.pose_entry(values.get("model") or None)  # appended last: older callers send none
        person = need(values["person"], "photo of the person to keep")
        target = upload_path(values["target"], "target-pose photo")
        densepose_upload = upload_path(values["densepose_upload"], "DensePose image")
        if target is None and densepose_upload is None:
            raise UserError("Upload a photo in the target pose (or its DensePose image) first.")
        with OptionCheck() as check:
            options = limits_for(model).options(values, check)
            view = check.choice("result", ResultView, values.get("result", ResultView.FRAMED.value))  # appended last
        return cls(person, target, densepose_upload, options, view, model)


POSE_PARAMETERS = ("person", "target", "densepose_upload", *GENERATION_PARAMETERS, "record", *FOCUS_PARAMETERS,
                   "result", "model", "samples", *SAMPLING_PARAMETERS)
CHAINS = (("use-person", "Use as person to keep"), ("to-tryon", "Send to try-on"))


@user_errors
def pose_transfer(engine: Engine, progress=gr.Progress(track_tqdm=True), **values):
    """``/pose_transfer``: ``values`` are named by ``POSE_PARAMETERS``."""
    request = PoseRequest.from_values(values, engine.limits_for)
    should_stop = stop_requested()
    progress(0.0, desc="Preprocessing the photos")
    try:  # with a DensePose image the target photo is not needed (engine.inputs.pose_inputs)
        inputs = engine.pose_inputs(request.person, request.target, densepose=request.densepose_upload,
                                    view=request.view, model=request.model)
    except NoPersonError as e:
        if "target" not in str(e):  # the person to keep: no DensePose image replaces that photo
            raise
        raise NoPersonError(f"{str(e).rstrip('.')}.\n{POSE_DENSEPOSE_HINT}") from None
    say_who_was_framed(inputs.reference_framing, inputs.target_framing)
    generations = engine.generate(request.model, inputs.target, inputs.reference, inputs.mask, inputs.densepose,
                                  request.options, reporter(progress), should_stop, appearance=inputs.appearance)
    texture, face = appearance_previews(inputs)
    answer, seed, state, group, step, gallery = result_outputs([Sample(g.image, g) for g in generations])
    return (answer, seed, inputs.densepose, state, group, step,
            framing_preview(inputs.reference_framing, inputs.target_framing), texture, face, gallery)


def appearance_previews(inputs: PoseInputs) -> tuple[Image.Image | None, Image.Image | None]:
    """What a model that conditions on appearance (MCLD) saw of the kept person: its texture map, and
    its picture with the face found boxed (the picture itself, unboxed, when there was no face: the
    identity embedding was zeros); (None, None) for the other models."""
    if inputs.appearance is None:
        return None, None
    box = inputs.appearance.face_box
    face = inputs.reference if box is None else box_drawn(inputs.reference, Box(*(round(v) for v in box)),
                                                          INTERMEDIATE_HEIGHT * 2)
    return inputs.appearance.texture, face


def model_changed(engine: Engine, name: str):
    """The option components for the chosen model: its step and guidance ranges and defaults, the
    options it lacks turned off, and its own intermediate results shown."""
    model = registry.pose_entry(name)
    limits, supports = engine.limits_for(model), model.supports
    fast = supports.fast_sampling
    return (gr.update(minimum=limits.steps_min_for(fast_sampling=True), maximum=limits.steps_max,
                      value=limits.steps_default),
            gr.update(minimum=limits.guidance_min, maximum=limits.guidance_max, value=limits.guidance_default),
            gr.update(interactive=supports.ref_acceleration, value=False),
            gr.update(interactive=supports.attention_recording, value=False),
            gr.update(visible=supports.attention_focus), gr.update(value=1.0),  # focus 1 = off
            gr.update(visible=needs_appearance(model)),  # the texture map and face intermediates
            # fast sampling: Leffa's; back to the model's own sampling for the others
            gr.update(visible=fast), *((gr.update(),) * 4 if fast else (MODEL_SAMPLER, 0.0, 1.0, 1)))


def build_pose_tab(engine: Engine) -> TabParts:
    """The tab; returns its person upload and result column (the demo wires the chains across tabs)."""
    with gr.Tab("Pose transfer", id="pose"):
        gr.Markdown(POSE_HELP)
        notice_tab(task_notice(engine, Task.POSE), "pose-weights")
        c = {}
        (c["person"], c["target"]), column = input_row(
            "pose", ("Person to keep", "person", "person"), ("Person in the target pose", "pose", "target"),
            chains=CHAINS)
        state = column.state
        c["densepose_upload"] = gr.Image(label="…or the target pose as a DensePose IUV image (optional: replaces "
                                               "the target photo's)", type="filepath", height=INTERMEDIATE_HEIGHT,
                                         elem_id="pose-densepose-upload")
        c["model"] = gr.Radio(MODEL_CHOICES, value=MODEL_CHOICES[0][1], label="Model", info=MODEL_HELP,
                              elem_id="pose-model")
        with gr.Accordion("Advanced options", open=False):
            c["result"] = gr.Radio(RESULT_CHOICES, value=ResultView.FRAMED.value, label="Result")
            c.update(generation_options(tab_limits(engine, Task.POSE), with_repaint=False))
        with gr.Accordion("Intermediate results", open=False) as intermediates:
            with gr.Row():
                densepose = intermediate("DensePose IUV of the target", "pose-densepose")
                framing = intermediate("Framing: the boxes of the two photos the model sees", "pose-framing")
            with gr.Row(visible=False) as appearance_row:  # MCLD's: shown while it is chosen
                texture = intermediate("MCLD: texture map of the person to keep (body UV space)", "pose-texture")
                face = intermediate("MCLD: the face whose identity is kept (none boxed: no face found)", "pose-face")
        group, step = attention_panel(column.image, state, "person")
    c["model"].change(functools.partial(model_changed, engine), c["model"],
                      [c["steps"], c["guidance"], c["ref_acceleration"], c["record"], c["focus_group"], c["focus"],
                       appearance_row, c["sampling_group"], *(c[n] for n in SAMPLING_PARAMETERS)],
                      queue=False, api_visibility="private")
    wire_generation(column, functools.partial(pose_transfer, engine), {name: c[name] for name in POSE_PARAMETERS},
                    [densepose, state, group, step, framing, texture, face, column.gallery], "pose_transfer",
                    intermediates)
    column.chains["use-person"].click(chosen_result, state, c["person"], api_visibility="private")
    return TabParts(c["person"], column)
