"""The pose transfer tab: the person to keep + a person in the target pose, and the
``/pose_transfer`` endpoint."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine import registry
from engine.options import GenerateOptions, OptionCheck, OptionLimits
from engine.registry import Task
from engine.service import Engine
from errors import UserError
from preprocess.openpose import NoPersonError
from webapp.components import (FOCUS_PARAMETERS, GENERATION_PARAMETERS, attention_outputs, attention_panel,
                               generation_options, input_row, intermediate, need, notice_tab, reporter,
                               stop_requested, tab_limits, task_notice, upload_path, user_errors, wire_generation)

POSE_HELP = """Upload the person to keep and a person in the target pose (or, in the advanced options, the
target's DensePose IUV image), then **Generate**. To see where a point of the result looked in the person,
tick *Record attention maps* (advanced options) before generating, then click the result."""
# what to do when DensePose finds nobody in the target photo: this tab's own upload field
POSE_DENSEPOSE_HINT = ("Use a photo of one person in the target pose, or upload its DensePose IUV image under "
                       "'Advanced options' on this tab.")


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
        person = need(values["person"], "a photo of the person to keep")
        target = upload_path(values["target"], "target-pose photo")
        densepose_upload = upload_path(values["densepose_upload"], "DensePose image")
        if target is None and densepose_upload is None:
            raise UserError("Upload a photo in the target pose (or its DensePose image) first.")
        with OptionCheck() as check:
            options = limits.options(values, check)
        return cls(person, target, densepose_upload, options)


POSE_PARAMETERS = ("person", "target", "densepose_upload", *GENERATION_PARAMETERS, "record", *FOCUS_PARAMETERS)


@user_errors
def pose_transfer(engine: Engine, progress=gr.Progress(track_tqdm=True), **values):
    """``/pose_transfer``: ``values`` are named by ``POSE_PARAMETERS``."""
    request = PoseRequest.from_values(values, tab_limits(engine, Task.POSE))
    should_stop = stop_requested()
    progress(0.0, desc="Preprocessing the photos")
    try:  # with a DensePose image the target photo is not needed (engine.inputs.pose_inputs)
        inputs = engine.pose_inputs(request.person, request.target, densepose=request.densepose_upload)
    except NoPersonError as e:  # only the target photo is analysed (by DensePose)
        raise NoPersonError(f"{str(e).rstrip('.')}.\n{POSE_DENSEPOSE_HINT}") from None
    gen = engine.generate(registry.pose_entry(), inputs.target, inputs.reference, inputs.mask, inputs.densepose,
                          request.options, reporter(progress), should_stop)
    return (gen.image, gen.seed, inputs.densepose, *attention_outputs(gen))


def build_pose_tab(engine: Engine) -> None:
    with gr.Tab("Pose transfer", id="pose"):
        gr.Markdown(POSE_HELP)
        notice_tab(task_notice(engine, Task.POSE), "pose-weights")
        state = gr.State(None)
        c = {}
        (c["person"], c["target"]), column = input_row(
            "pose", ("Person to keep", "person", "person"), ("Person in the target pose", "pose", "target"))
        with gr.Accordion("Advanced options", open=False):
            c["densepose_upload"] = gr.Image(label="DensePose IUV image of the target pose (optional: replaces the "
                                                   "computed one)", type="filepath")
            c.update(generation_options(tab_limits(engine, Task.POSE), with_repaint=False))
        with gr.Accordion("Intermediate results", open=False):
            densepose = intermediate("DensePose IUV of the target", "pose-densepose")
        group, step = attention_panel(column.image, state, "person")
    wire_generation(column, functools.partial(pose_transfer, engine),
                    {name: c[name] for name in POSE_PARAMETERS}, [densepose, state, group, step], "pose_transfer")
