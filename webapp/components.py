"""What the app's tabs share: the option components and the result column, the generation
wiring (one model slot, Stop), the attention panel, uploads, weight notices, and the error toasts.

The event handlers are module-level functions that take the engine explicitly (bound with
``functools.partial``); the generation endpoints receive their values by parameter name and pack
them into a request first, which checks every value (the events run with ``preprocess=False``: API
callers' values arrive as sent)."""

from __future__ import annotations

import functools
import html
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from engine.options import MODEL_SAMPLER, OptionLimits, SamplingPreset
from engine.progress import Progress, ShouldStop, never_stop
from engine.registry import Task, WeightSet, default_for, for_task
from engine.service import Engine, Generation
from errors import GenerationStopped, UserError
from runtime.memory import free_accelerator_memory
from runtime.sampling import Sampler
from preprocess.framing import Box, Framing, box_drawn
from webapp.attention_view import heatmap_overlay, layer_groups, mark_point, warped_reference, with_colour_legend
from weightfiles.manifest import download_size

LOG = logging.getLogger(__name__)
BUG_MESSAGE = "Something went wrong on the server (its log has the details). Try again; if it happens again, report it."
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# every event that runs a model (preprocessing or generation) shares one slot: one at a time in all
MODEL_SLOT = "model"
# displayed heights (pixels) of the attention pictures and the intermediate results
ATTENTION_HEIGHT, INTERMEDIATE_HEIGHT = 380, 300
# an error toast goes after this many seconds, unless it has more characters than this (or several
# lines): then it stays until closed
TOAST_SECONDS, SHORT_MESSAGE = 10, 100


def weights_notice(engine: Engine, weight_set: WeightSet, *also: WeightSet) -> str:
    """A tab's notice while weights it needs are not on the server yet (empty once they are):
    which, and how much is downloaded on first use. ``also``: the other choices on the tab that
    need more (the DressCode model on the try-on tab)."""
    missing = engine.missing_weights(weight_set)
    lines = []
    if missing:
        lines.append(f"⏬ Not on this server yet: {', '.join(f'`{f}`' for f in missing)} (about "
                     f"{download_size(missing)}). They are downloaded on first use, "
                     "so the first generation takes longer.")
    for other in also:
        extra = [f for f in engine.missing_weights(other) if f not in missing]
        if extra:
            lines.append(f"The {other.value} model ({', '.join(f'`{f}`' for f in extra)}, about "
                         f"{download_size(extra)}) is downloaded when first chosen.")
    return "> " + "\n> ".join(lines) if lines else ""


def task_notice(engine: Engine, task: Task) -> str:
    """``weights_notice`` for a tab: its task's default model's files, then the other models'."""
    default, *others = for_task(task)
    return weights_notice(engine, default.weight_set, *(e.weight_set for e in others))


def tab_limits(engine: Engine, task: Task) -> OptionLimits:
    """The option ranges a tab offers and its endpoint accepts: its task's default model's
    (``Engine.generate`` checks the chosen model's own too)."""
    return engine.limits_for(default_for(task))


def notice_tab(notice: str, elem_id: str) -> None:
    """The weights notice on a tab, only when there is one (no empty component on the page)."""
    if notice:
        gr.Markdown(notice, elem_id=elem_id)


def toast(message: str) -> gr.Error:
    """A message for the page: shown as written (HTML characters escaped; line breaks kept by
    ``PAGE_CSS``); a long one stays until closed."""
    duration = None if len(message) > SHORT_MESSAGE or "\n" in message else TOAST_SECONDS
    return gr.Error(html.escape(message, quote=False), duration=duration, print_exception=False)


def user_errors(fn):
    """Turn the failures a user can act on into error toasts, and any other (a bug) into a short
    message, its traceback logged (``launch``'s ``show_error`` would send its text to the page); the
    app keeps serving."""

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
        except UserError as e:
            raise toast(str(e)) from None
        except Exception as e:  # a bug: its traceback goes to the server's log; the page gets no internals
            LOG.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(BUG_MESSAGE, print_exception=False) from e

    return wrapper


def upload_path(payload, what: str) -> str | None:
    """The cached file of an upload (events run with preprocess=False, so that our own loader,
    not Gradio's, reads every upload and reports bad files clearly); ``what`` names it ("person
    photo")."""
    if payload is None:
        return None
    path = payload.get("path") if isinstance(payload, dict) else payload
    if not isinstance(path, str) or not path:
        raise UserError(f"The {what} did not arrive completely; upload it again.")
    return path


def need(payload, what: str) -> str:
    """``upload_path`` of an upload the request cannot do without."""
    path = upload_path(payload, what)
    if path is None:
        raise UserError(f"Upload {'an' if what[0] in 'aeiou' else 'a'} {what} first.")
    return path


def examples(folder: str) -> list[str]:
    return sorted(str(p) for p in (EXAMPLES / folder).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))


# The endpoints' parameters, in their order (the API's; README documents it): each tab's builder
# wires its components to these names, and the handler receives them by name.
GENERATION_PARAMETERS = ("steps", "guidance", "seed", "random_seed", "ref_acceleration")
# the experimental attention focus: last, so that the parameters before keep their positions
FOCUS_PARAMETERS = ("focus", "focus_levels", "focus_start", "focus_end")
# fast sampling (leffa.sampling): appended after every earlier parameter, each optional
SAMPLING_PARAMETERS = ("sampler", "guidance_start", "guidance_end", "cache_interval")
SAMPLER_CHOICES = [("The model's own (Leffa: DDPM, as published)", MODEL_SAMPLER),
                   ("DPM-Solver++ 2M", Sampler.DPM_SOLVER.value), ("UniPC", Sampler.UNIPC.value),
                   ("DDIM", Sampler.DDIM.value), ("DDPM", Sampler.DDPM.value)]
PRESET_CHOICES = [("Published (30 DDPM steps)", SamplingPreset.PUBLISHED.value),
                  ("Fast", SamplingPreset.FAST.value), ("Preview", SamplingPreset.PREVIEW.value)]
SAMPLING_HELP = ("Fewer, cheaper denoising steps without retraining. Presets chosen on a trained toy model "
                 "(README, *Fast sampling*): Fast kept the published quality there; Preview is for a quick look.")


# -- handlers: module-level, the engine bound with functools.partial -------------------------------
# The generation handlers get their values as keywords (the events' ``inputs_kwargs``; the API keeps
# these names and order). ``progress`` stays the one positional parameter: Gradio injects gr.Progress
# only into a positional slot.
def reporter(progress, clock=time.monotonic) -> Progress:
    """The engine's progress on Gradio's bar; once two steps have run, the denoising phase says about
    how long is left (from the time per step since the first one ended: encoding and warming up
    are not steps)."""
    started: dict[str, float] = {}

    def report(fraction: float, desc: str) -> None:
        step = STEP.fullmatch(desc)
        if step and int(step[1]) > 0:
            done, total = int(step[1]), int(step[2])
            now = clock()
            at, first = started.setdefault("at", now), started.setdefault("from", done)
            if done > first:
                left = (now - at) / (done - first) * (total - done)
                desc = f"{desc} (about {_duration(left)} left)"
        progress(fraction, desc=desc)

    return report


STEP = re.compile(r"Denoising step (\d+)/(\d+)")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


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


@dataclass(frozen=True)
class Sample:
    """One sample of a tab's result: what it answers with (the photo, or the model's picture), its
    generation, and the tab's own pictures of it (the try-on tab: an outfit's later passes)."""

    answer: Image.Image
    generation: Generation
    pictures: tuple = ()


@dataclass(frozen=True)
class Shown:
    """A tab's result, for the gallery, the attention panel and the chain buttons: its ``samples``,
    the ``chosen`` one and, when the result shown is the person's photo, the ``box`` of it that the
    model's picture is (a click maps through it)."""

    samples: tuple[Sample, ...]
    box: Box | None = None
    chosen: int = 0

    @property
    def sample(self) -> Sample:
        return self.samples[self.chosen]

    @property
    def generation(self) -> Generation:
        return self.sample.generation

    def choose(self, index: int) -> Shown:
        if not 0 <= index < len(self.samples):
            raise UserError("Choose one of the samples in the gallery.")
        return replace(self, chosen=index)

    def point(self, x: float, y: float, on_result: bool) -> tuple[float, float]:
        """A click at pixel (x, y), as a point of the model's picture in [0, 1]²; a click on the
        photo outside the box the model saw is a ``UserError``."""
        if on_result and self.box is not None:
            fx, fy = (x - self.box.x0) / self.box.width, (y - self.box.y0) / self.box.height
            if not (0 <= fx <= 1 and 0 <= fy <= 1):
                raise UserError("That point is outside the part of your photo the model saw (the box under "
                                "'Intermediate results'): click inside it.")
        else:
            w, h = self.generation.image.size
            fx, fy = x / w, y / h
        return min(max(fx, 0.0), 1.0), min(max(fy, 0.0), 1.0)


def gallery_value(samples: Sequence[Sample]) -> list[tuple[Image.Image, str]]:
    """The samples as the gallery shows them (and the API returns them): each answer with its seed."""
    return [(s.answer, f"seed {s.generation.seed}") for s in samples]


def result_outputs(samples: Sequence[Sample], shown_box: Box | None = None):
    """(result, seed used, state, layer-group dropdown, step dropdown, gallery) after a generation:
    the first sample chosen. The steps are listed 1-based as the progress counts them ("2/4": after
    the second of four steps); their values are the recorder's 0-based step indices."""
    state = Shown(tuple(samples), shown_box)
    gen = state.generation
    gallery = gallery_value(samples)  # a plain value for API callers; shown by ``_gallery_shown``
    if gen.recorder is None:
        dropdowns = gr.update(choices=[], value=None), gr.update(choices=[], value=None)
    else:
        groups = list(layer_groups(gen.recorder))
        steps = [(f"{step + 1}/{gen.steps}", step) for step in gen.recorder.steps()]
        dropdowns = gr.update(choices=groups, value=groups[0]), gr.update(choices=steps, value=steps[-1][1])
    return state.sample.answer, gen.seed, state, *dropdowns, gallery


@user_errors
def choose_sample(state: Shown | None, evt: gr.SelectData):
    """A sample clicked in the gallery becomes the result: (result, seed used, state, its pictures)."""
    if state is None:
        raise UserError("Generate first.")
    chosen = state.choose(evt.index)
    return chosen.sample.answer, chosen.generation.seed, chosen, *chosen.sample.pictures


@user_errors
def chosen_result(state: Shown | None) -> Image.Image:
    """The chosen sample's answer (what the chain buttons pass on)."""
    if state is None:
        raise UserError("Generate a result first.")
    return state.sample.answer


def _recorded(state: Shown | None) -> Shown:
    if state is None or state.generation.recorder is None:
        raise UserError("Turn on 'Record attention maps' in the advanced options and generate first.")
    return state


@user_errors
def show_attention(state: Shown | None, group, step, evt: gr.SelectData, on_result: bool = False):
    """The clicked point marked on a copy of the model's picture, and the heatmap (with its colour
    legend) of where it looked in the reference. ``on_result``: the click was on the tab's result
    (the photo, when that is what it shows), not on the copy."""
    state = _recorded(state)
    gen = state.generation
    point = state.point(*evt.index, on_result)
    heat = heatmap_overlay(gen.recorder, int(step), layer_groups(gen.recorder)[group], point, gen.reference,
                           gen.row)
    return mark_point(gen.image, point), with_colour_legend(heat)


def show_attention_on_result(state: Shown | None, group, step, evt: gr.SelectData):
    """``show_attention`` for a click on the tab's result (the photo, when that is what it shows)."""
    return show_attention(state, group, step, evt, on_result=True)


@user_errors
def warp(state: Shown | None, group, step):
    """The reference warped by the attention flow."""
    gen = _recorded(state).generation
    return warped_reference(gen.recorder, int(step), layer_groups(gen.recorder)[group], gen.reference, gen.row)


def framing_preview(*framings: Framing | None) -> Image.Image | None:
    """The photos with the boxes the model saw of them (and, in grey, the other people found), side
    by side (None when none was framed around a person)."""
    shown = [box_drawn(f.photo, f.box, INTERMEDIATE_HEIGHT * 2, f.others) for f in framings if f is not None and f.people]
    if not shown:
        return None
    side = Image.new("RGB", (sum(p.width for p in shown) + 8 * (len(shown) - 1), max(p.height for p in shown)), "white")
    x = 0
    for picture in shown:
        side.paste(picture, (x, 0))
        x += picture.width + 8
    return side


def say_who_was_framed(*framings: Framing | None) -> None:
    """A notice when a photo holds several people (the largest is the one the model sees)."""
    for framing in framings:
        if framing is not None and framing.people > 1:
            gr.Info(f"{framing.people} people in the photo: the largest is the one framed (see Intermediate results).")


FOCUS_HELP = ("Divides the attention logits over the garment (or the kept person) by τ in the finest layers, "
              "at inference, without retraining. Off by default: on our toy it did not replace the Leffa loss "
              "(see the README's *Attention focus*).")


def preset_chosen(published_steps: int, preset: str):
    """The steps and the sampling options of a preset (the published one: the model's default steps)."""
    setting = SamplingPreset(preset).setting
    steps = published_steps if preset == SamplingPreset.PUBLISHED.value else setting.steps
    return (steps, setting.sampler.value if setting.sampler else MODEL_SAMPLER, *setting.guidance_interval,
            setting.cache_interval)


# -- layout: shared parts, one builder per tab, the demo --------------------------------------------
def generation_options(limits: OptionLimits, with_repaint: bool) -> dict[str, gr.components.Component]:
    """The generation option components, by endpoint parameter name; ranges from ``limits``."""
    c = {"steps": gr.Slider(limits.steps_min_for(fast_sampling=True), limits.steps_max, value=limits.steps_default,
                            step=1, label="Steps"),
         "guidance": gr.Slider(limits.guidance_min, limits.guidance_max, value=limits.guidance_default, step=0.1,
                               label="Guidance scale")}
    with gr.Row():
        c["seed"] = gr.Number(limits.seed_default, precision=0, minimum=0, maximum=limits.seed_max, label="Seed")
        c["random_seed"] = gr.Checkbox(False, label="Random seed")
    c["samples"] = gr.Slider(1, limits.samples_max, value=1, step=1, label="Samples",
                             info="Variations to choose from: sample k uses seed + k (one batch where memory allows)")
    c["ref_acceleration"] = gr.Checkbox(False, label="Reference acceleration (~30% faster, may slightly reduce quality)")
    if with_repaint:
        c["repaint"] = gr.Checkbox(False, label="Repaint (keep the person's pixels outside the mask)")
    c["record"] = gr.Checkbox(False, label="Record attention maps (slower; enables the attention panel)")
    with gr.Accordion("Fast sampling", open=False) as c["sampling_group"]:
        c["sampling"] = gr.Radio(PRESET_CHOICES, value=SamplingPreset.PUBLISHED.value,
                                 label="Preset (sets the steps and the options below)", info=SAMPLING_HELP)
        c["sampler"] = gr.Dropdown(SAMPLER_CHOICES, value=MODEL_SAMPLER, label="Sampler",
                                   info="the multistep samplers reach a similar image in far fewer steps")
        with gr.Row():
            c["guidance_start"] = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Guide from noise level",
                                            info="t/1000; guidance outside runs one UNet pass instead of two")
            c["guidance_end"] = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="…up to noise level")
        c["cache_interval"] = gr.Slider(1, limits.cache_interval_max, value=1, step=1, label="Feature cache interval",
                                        info="the whole UNet every N steps, its outer blocks between (1 = off)")
    c["sampling"].change(functools.partial(preset_chosen, limits.steps_default), c["sampling"],
                         [c["steps"], *(c[name] for name in SAMPLING_PARAMETERS)], queue=False,
                         api_visibility="private")
    with gr.Accordion("Experimental: attention focus", open=False) as c["focus_group"]:
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
    gallery: gr.Gallery  # the samples, shown when there are several
    state: gr.State  # the result shown (``Shown``)
    chains: dict[str, gr.Button]  # the buttons that pass the chosen result on, by key


@dataclass(frozen=True)
class TabParts:
    """What a tab shows the others: the upload a chained result goes into, and its result column."""

    person: gr.Image
    column: ResultColumn


def input_row(prefix: str, *uploads_spec: tuple[str, str, str],
              chains: Sequence[tuple[str, str]] = ()) -> tuple[list[gr.Image], ResultColumn]:
    """Uploads with their example galleries, and the result column: the result, Generate and Stop,
    the seed used, the samples' gallery and the ``chains`` buttons ((key, label) each: they pass the
    chosen result on; the tab wires them).

    ``uploads_spec``: (label, examples folder, element-id suffix) per upload."""
    uploads = []
    with gr.Row():
        for label, folder, key in uploads_spec:
            with gr.Column():
                # PNG: a result chained in (``chosen_result``) is kept losslessly, not as Gradio's default WebP
                image = gr.Image(label=label, type="filepath", height=420, elem_id=f"{prefix}-{key}", format="png")
                gr.Examples(examples(folder), inputs=image, label=f"Examples: {folder}")
                uploads.append(image)
        with gr.Column():
            result = gr.Image(label="Result (click a point: attention maps below)", type="pil", interactive=False,
                              height=420, elem_id=f"{prefix}-result", format="png")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate", scale=3)
                stop = gr.Button("Stop", variant="secondary", interactive=False, elem_id=f"{prefix}-stop", scale=1)
            seed_used = gr.Number(label="Seed used", interactive=False, precision=0, visible=False,
                                  elem_id=f"{prefix}-seed")
            gallery = gr.Gallery(label="Samples: click one to make it the result", columns=4, height=220,
                                 visible=False, allow_preview=False, format="png", elem_id=f"{prefix}-samples")
            with gr.Row():
                buttons = {key: gr.Button(label, size="sm", elem_id=f"{prefix}-{key}") for key, label in chains}
    return uploads, ResultColumn(result, seed_used, run, stop, gallery, gr.State(None), buttons)


def wire_generation(column: ResultColumn, handler, inputs: dict[str, gr.components.Component], outputs: list,
                    api_name: str, intermediates: gr.Accordion, sample_pictures: Sequence[gr.Image] = ()) -> None:
    """``column.run`` runs ``handler`` (in the one model slot); ``column.stop``, quiet until then,
    cancels it (the handler stops at its next denoising step); the seed shows and the
    ``intermediates`` open once a generation succeeds; a refused one leaves no error mark on the result.
    A sample clicked in the gallery becomes the result, with its ``sample_pictures`` (``Sample.pictures``)."""
    column.run.click(_stop_ready, None, column.stop, queue=False, api_visibility="private")
    event = column.run.click(handler, inputs_kwargs=inputs, outputs=[column.image, column.seed_used, *outputs],
                             api_name=api_name, api_description=False, preprocess=False, concurrency_id=MODEL_SLOT)
    event.success(_reveal, None, [column.seed_used, intermediates, column.stop], queue=False,
                  api_visibility="private")
    event.success(_gallery_shown, column.state, column.gallery, queue=False, api_visibility="private")
    event.failure(_unchanged, None, [column.image, column.stop], queue=False, api_visibility="private")
    column.stop.click(_stop_quiet, None, column.stop, cancels=[event], queue=False, api_visibility="private")
    column.gallery.select(choose_sample, column.state, [column.image, column.seed_used, column.state, *sample_pictures],
                          queue=False, api_visibility="private")


def _reveal():
    return gr.update(visible=True), gr.update(open=True), _stop_quiet()


def _gallery_shown(state: Shown | None):
    """The samples' gallery, shown when there are several to choose from, the first one chosen."""
    several = state is not None and len(state.samples) > 1
    return gr.update(visible=several, selected_index=0 if several else None)


def _unchanged():
    """The result as it was (its error status cleared once the message has been shown), Stop quiet."""
    return gr.update(), _stop_quiet()


def _stop_ready():
    return gr.update(interactive=True, variant="stop")


def _stop_quiet():
    return gr.update(interactive=False, variant="secondary")


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
    result.select(show_attention_on_result, [state, group, step], [point, heat], api_visibility="private")
    point.select(show_attention, [state, group, step], [point, heat], api_visibility="private")
    warp_button.click(warp, [state, group, step], warped, api_visibility="private")
    return group, step


def intermediate(label: str, elem_id: str | None = None) -> gr.Image:
    return gr.Image(label=label, interactive=False, type="pil", format="png", height=INTERMEDIATE_HEIGHT,
                    elem_id=elem_id)
