"""The sampling options (issue 24) as names and checked values, without importing torch: the command
line and the app list them before anything heavy is imported. What they do is in ``leffa.sampling``."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from enum import Enum
from typing import Any

from errors import OptionError
from runtime.presets import MemoryPreset


class Sampler(str, Enum):
    """How the latents are stepped from noise to the image (``--sampler``); values are what users type."""

    DDPM = "ddpm"  # the published sampler (ancestral)
    DDIM = "ddim"  # deterministic (eta 0)
    DPM_SOLVER = "dpm++2m"  # DPM-Solver++ 2M: second-order multistep
    UNIPC = "unipc"  # UniPC: second-order predictor-corrector

    @property
    def published(self) -> bool:
        return self is Sampler.DDPM


SAMPLERS = tuple(s.value for s in Sampler)


@dataclass(frozen=True)
class GuidanceInterval:
    """Classifier-free guidance at the steps whose timestep ``t`` has ``start <= t / T <= end``
    (``T``: the training schedule's 1000 steps; t / T is the noise level's rank, 1 = pure noise), the
    conditional prediction alone elsewhere. Kynkäänniemi et al. (NeurIPS 2024) guide in the middle
    noise levels only: at high noise guidance narrows the images to few modes, at low noise it has
    little left to do. ``(0, 1)`` guides every step (plain CFG)."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        values = (self.start, self.end)
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) for v in values) \
                or not 0.0 <= self.start <= self.end <= 1.0:
            raise OptionError(f"the guidance interval must be (start, end) with 0 ≤ start ≤ end ≤ 1 "
                              f"(fractions of the noise schedule; (0, 1) guides every step), got {values!r}")
        object.__setattr__(self, "start", float(self.start))
        object.__setattr__(self, "end", float(self.end))

    @property
    def everywhere(self) -> bool:
        return self.start == 0.0 and self.end == 1.0

    def guides(self, timestep: Any, num_train_timesteps: int) -> bool:
        """Whether the step at ``timestep`` (an int or a 0-d tensor) is guided."""
        return self.everywhere or self.start <= int(timestep) / num_train_timesteps <= self.end


def check_cache_interval(interval: Any) -> int:
    """The feature cache's interval: a whole number >= 1 (1 = off)."""
    if isinstance(interval, float) and interval.is_integer():
        interval = int(interval)
    if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
        raise OptionError(f"the feature cache interval must be a whole number >= 1 (1 = no cache: every step "
                          f"runs the whole UNet), got {interval!r}")
    return int(interval)


def cache_refusal(memory: MemoryPreset) -> str | None:
    """Why the feature cache cannot run under ``memory``, or None: block-by-block offloading (diffusers'
    group offloading, ``runtime.placement``) onloads and prefetches the blocks in the order the whole
    UNet runs them, which the cache's shallow steps skip."""
    if not memory.group_offload:
        return None
    return (f"the feature cache cannot run under the {memory.value!r} memory preset (it offloads the UNet block "
            "by block, every block in order); use 'balanced', or cache interval 1")
