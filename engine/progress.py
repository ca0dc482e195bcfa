"""How a request reports its progress and is asked to stop (Gradio-free: the app passes its
progress bar and its client's state, the command line a tqdm bar)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]  # (fraction of the whole request done, what runs now)
ShouldStop = Callable[[], bool]  # asked after every denoising step: True stops the generation
# where each phase of a request starts on its progress bar (preprocessing starts at 0)
LOADING, DENOISING, DECODING = 0.05, 0.1, 0.95


def no_progress(fraction: float, desc: str) -> None:
    pass


def never_stop() -> bool:
    return False


def step_callback(progress: Progress, should_stop: ShouldStop) -> Callable[[int, int], bool]:
    """A pipeline's step callback: the phase and its share of the progress bar; False to stop."""

    def callback(step: int, total: int) -> bool:
        if step < total:
            progress(DENOISING + (DECODING - DENOISING) * step / total, f"Denoising step {step}/{total}")
        else:
            progress(DECODING, "Decoding the image")
        return not should_stop()

    return callback
