"""The Gradio UI: ``create_demo(engine)`` builds it (one builder per tab: ``webapp/tryon_tab.py``,
``webapp/pose_tab.py``; what they share: ``webapp/components.py``), ``launch(demo, settings)`` serves it."""

from __future__ import annotations

import gradio as gr

from engine.service import Engine
from webapp.components import EXAMPLES, ROOT, TabParts, chosen_result
from webapp.pose_tab import build_pose_tab
from webapp.tryon_tab import build_tryon_tab

# uploads and results in Gradio's cache: checked every hour, deleted when older than a day
UPLOAD_CACHE_LIFETIME = (3600, 86400)

# Gradio renders a toast's message as HTML: keep its line breaks and indented commands as written.
# The mask editor's own 'Clear canvas' (the last button of its toolbar) drops the photo too, and in
# Gradio 6.31 a value sent back after it does not show: hidden, our 'Clear mask' keeps the photo.
# The brush colour is fixed (magenta): its colour button would only offer that one colour.
PAGE_CSS = """.toast-message-text { white-space: pre-wrap; }
#tryon-mask-editor .top-panel > button:last-of-type { display: none; }
#tryon-mask-editor button[aria-label="Color"] { display: none; }"""


TITLE = """# Leffa: virtual try-on and pose transfer
Re-implementation of *Learning Flow Fields in Attention for Controllable Person Image Generation*
(Zhou et al., CVPR 2025)"""
PUBLISHED_WEIGHTS = " with the authors' published weights."
TINY_BANNER = """> ⚠️ **Offline demo mode (`--tiny`)**: a tiny **untrained** model with random weights and
> stand-in preprocessing, not the published weights. Everything runs, but the pictures are noise. Start without
> `--tiny` for the real models."""


def header(tiny: bool) -> str:
    """The page's title and what it is; the published weights only where they are used."""
    return TITLE + ("." if tiny else PUBLISHED_WEIGHTS)


def create_demo(engine: Engine) -> gr.Blocks:
    """The app: a tab per task; option ranges from the registry entries' limits (``engine.limits_for``)."""
    with gr.Blocks(title="Leffa: virtual try-on and pose transfer", delete_cache=UPLOAD_CACHE_LIFETIME) as demo:
        gr.Markdown(header(engine.tiny))
        if engine.tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        with gr.Tabs() as tabs:
            tryon = build_tryon_tab(engine)
            pose = build_pose_tab(engine)
        chain(tryon.column.chains["to-pose"], tryon, pose, tabs, "pose")
        chain(pose.column.chains["to-tryon"], pose, tryon, tabs, "tryon")
    return demo


def chain(button: gr.Button, source: TabParts, target: TabParts, tabs: gr.Tabs, tab_id: str) -> None:
    """``button`` puts ``source``'s chosen result into ``target``'s person upload and opens its tab."""
    button.click(lambda state: (chosen_result(state), gr.Tabs(selected=tab_id)), source.column.state,
                 [target.person, tabs], api_visibility="private")


def launch(demo: gr.Blocks, settings, **kwargs):
    """Serve with one generation at a time, a bounded queue and bounded uploads. ``show_error``: what
    Gradio's own layer refuses (a file that was not uploaded, too few parameters) reaches the client
    with its message instead of ``{"error": null}``."""
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share, show_error=True,
                       max_file_size=settings.max_file_size, allowed_paths=[str(EXAMPLES)],
                       blocked_paths=[str(ROOT / "ckpts")], css=PAGE_CSS, **kwargs)
