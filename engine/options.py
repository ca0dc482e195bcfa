"""The generation options and their limits, checked in one place for every application (the app's
endpoints, ``leffa tryon|pose`` and ``leffa infer``). Torch-free.

``OptionLimits`` are data: a model entry of the registry carries its own (``engine.registry``);
the UI's sliders read them, and ``OptionLimits.check`` refuses what lies outside, naming each
option as the caller names it (the API's parameter names, or the CLI's flags: ``OptionNames``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

from errors import OptionError, enum_option
from runtime.sampling import GuidanceInterval, Sampler

if TYPE_CHECKING:  # pragma: no cover
    from leffa.attention import AttentionFocus

MAX_SEED = 2**31 - 1
E = TypeVar("E", bound=Enum)


def _shown(value: Any) -> str:
    """A value as a message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class OptionCheck:
    """Checks raw option values (as an API caller or the command line sent them) one by one; each
    problem names the option and what it allows. Leaving the ``with`` block raises one
    ``OptionError`` that lists every problem, one per line."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __enter__(self) -> OptionCheck:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None and self.problems:
            raise OptionError("\n".join(self.problems))

    def integer(self, name: str, value: Any, low: int, high: int | None) -> int:
        """A whole number in [low, high] (``high`` None: no upper limit); a float with no
        fractional part (30.0) counts."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        whole = not isinstance(value, bool) and isinstance(value, int)
        if not whole or value < low or (high is not None and value > high):
            allowed = f"a whole number between {low} and {high}" if high is not None else f"at least {low} (a whole number)"
            self.problems.append(f"{name} must be {allowed}, got {_shown(value)}")
        return value

    def number(self, name: str, value: Any, low: float, high: float) -> float:
        """A number in [low, high] (NaN and infinities are outside every range)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            self.problems.append(f"{name} must be a number between {low} and {high}, got {_shown(value)}")
            return value
        return float(value)

    def flag(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            self.problems.append(f"{name} must be true or false, got {_shown(value)}")
        return value

    def choice(self, name: str, cls: type[E], value: Any) -> E:
        try:
            return enum_option(cls, value, name)
        except OptionError as e:
            self.problems.append(str(e))
            return value

    def unsupported(self, name: str, what: str) -> None:
        """An option the chosen model does not support (``ModelEntry.supports``)."""
        self.problems.append(f"{name}: {what}")


class ResultView(str, Enum):
    """What a request answers with (``--result``, the app's "Result"). Datasets (``leffa infer``) are
    framed already: they keep the canvas."""

    PHOTO = "photo"  # try-on: the photo itself at full resolution, the garment blended in (framed around the person)
    FRAMED = "framed"  # the model's 768x1024 picture of the photo framed around its person
    CANVAS = "canvas"  # the model's picture of the whole photo fitted onto the canvas (as the original app)

    @property
    def around_person(self) -> bool:
        return self is not ResultView.CANVAS


@dataclass
class GenerateOptions:
    steps: int = 30
    guidance_scale: float = 2.5
    seed: int | None = 42  # None: draw one (the seed used is returned)
    ref_acceleration: bool = False
    repaint: bool = False
    record_attention: bool = False
    attention_focus: AttentionFocus | None = None  # experimental (leffa.attention.AttentionFocus)
    guidance_rescale: float | None = None  # rescaled-CFG strength; None: the guidance scale (published)
    samples: int = 1  # variations: sample k is drawn with seed + k (one batch where memory allows)
    # cheaper sampling (leffa.sampling): None = the model's own sampler (Leffa: the published DDPM)
    sampler: Sampler | None = None
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide at t/1000 in [start, end]; (0, 1): every step
    cache_interval: int = 1  # the whole UNet every N steps, its shallow blocks between (DeepCache); 1 = off

    @property
    def fast_sampling(self) -> bool:
        """Whether any of the sampling options differs from the model's own sampling (unchecked values
        count as different)."""
        interval = self.guidance_interval
        every_step = isinstance(interval, (tuple, list)) and tuple(interval) == (0.0, 1.0)
        return self.sampler is not None or not every_step or self.cache_interval != 1


@dataclass(frozen=True)
class OptionNames:
    """What each option is called where it was given, for messages: the app's API parameters or the
    command line's flags."""

    steps: str = "steps"
    guidance: str = "guidance"
    guidance_rescale: str = "guidance_rescale"
    seed: str = "seed"
    ref_acceleration: str = "ref_acceleration"
    repaint: str = "repaint"
    record: str = "record"
    focus: str = "focus"
    focus_steps: str = "focus_start and focus_end"
    samples: str = "samples"
    sampler: str = "sampler"
    guidance_interval: str = "guidance_start and guidance_end"
    cache_interval: str = "cache_interval"


API_NAMES = OptionNames()
CLI_NAMES = OptionNames("--steps", "--guidance-scale", "--guidance-rescale", "--seed", "--ref-acceleration",
                        "--repaint", "--record", "--attention-focus", "--focus-steps", "--samples", "--sampler",
                        "--guidance-interval", "--cache-interval")
MODEL_SAMPLER = "model"  # the API's and the app's name for ``sampler=None``: the model's own sampler


class SamplingPreset(str, Enum):
    """The app's and the command line's sampling presets (``--sampling``), chosen from the toy
    measurements of ``experiments.toy_sampling`` (README, "Fast sampling")."""

    PUBLISHED = "published"
    FAST = "fast"
    PREVIEW = "preview"

    @property
    def setting(self) -> SamplingSetting:
        return SAMPLING_PRESETS[self]


SAMPLING_PRESET_NAMES = tuple(p.value for p in SamplingPreset)


@dataclass(frozen=True)
class SamplingSetting:
    """What a sampling preset sets: the steps and the three sampling options."""

    steps: int
    sampler: Sampler | None
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    cache_interval: int = 1

    @property
    def name(self) -> str:
        """e.g. "ddpm 10, guide 0.07-0.81, cache 2" (the toy table's and the benchmark's rows)."""
        parts = [f"{self.sampler.value if self.sampler else MODEL_SAMPLER} {self.steps}"]
        if tuple(self.guidance_interval) != (0.0, 1.0):
            parts.append(f"guide {self.guidance_interval[0]:g}-{self.guidance_interval[1]:g}")
        if self.cache_interval > 1:
            parts.append(f"cache {self.cache_interval}")
        return ", ".join(parts)

    def applied(self, options: GenerateOptions) -> GenerateOptions:
        return replace(options, steps=self.steps, sampler=self.sampler, guidance_interval=self.guidance_interval,
                       cache_interval=self.cache_interval)


def with_sampling(options: GenerateOptions, preset: SamplingPreset | str | None = None, *, steps: Any = None,
                  sampler: Any = None, guidance_interval: Any = None, cache_interval: Any = None,
                  preset_name: str = "--sampling") -> GenerateOptions:
    """``options`` with a sampling preset's setting (None: no preset), then each value given (None: not
    given) over it: the command line's ``--sampling fast --steps 16``."""
    if preset is not None:
        options = enum_option(SamplingPreset, preset, preset_name).setting.applied(options)
    given = {"steps": steps, "sampler": sampler, "guidance_interval": guidance_interval,
             "cache_interval": cache_interval}
    return replace(options, **{k: v for k, v in given.items() if v is not None})


SAMPLING_PRESETS = {
    SamplingPreset.PUBLISHED: SamplingSetting(30, None),
    # the toy table (README): ddpm 10, guide 0.07-0.81, cache 2: SSIM 0.645 ± 0.004 to the truth against the
    # published 0.634 ± 0.006, with 18 UNet passes of 60 (7 of them shallow)
    SamplingPreset.FAST: SamplingSetting(10, Sampler.DDPM, (0.07, 0.81), 2),
    # unipc 5, guide 0.07-0.81: 0.616 ± 0.002 with 9 passes
    SamplingPreset.PREVIEW: SamplingSetting(5, Sampler.UNIPC, (0.07, 0.81)),
}


def attention_focus(check: OptionCheck, temperature: float, levels: int = 1, steps: tuple[float, float] = (0.0, 1.0),
                    own_keys: bool = False, names: OptionNames = API_NAMES) -> AttentionFocus | None:
    """The experimental attention focus (``leffa.attention.AttentionFocus``, which checks the values)
    as the app and the command line ask for it; a bad value goes into ``check``, its steps named by
    ``names``."""
    from leffa.attention import AttentionFocus

    try:
        return AttentionFocus(temperature, levels, steps, own_keys)
    except OptionError as e:
        check.problems.append(str(e).replace("attention focus steps", names.focus_steps))
        return None


@dataclass(frozen=True)
class OptionLimits:
    """The ranges and defaults of the generation options, as data: what a front end offers (the
    UI's sliders read them) and what every application accepts (``check``)."""

    steps_min: int = 30  # the original demo's 30-100 steps, default 30
    steps_max: int | None = 100  # None: no limit of ours
    steps_default: int = 30
    guidance_min: float = 0.1
    guidance_max: float = 5.0
    guidance_default: float = 2.5
    seed_default: int = 42
    seed_max: int = MAX_SEED
    # the experimental attention focus, as the app offers it: its temperature (1 = off) and levels
    focus_min: float = 0.1
    focus_max: float = 2.0
    focus_levels_max: int = 4
    samples_max: int = 4  # variations per request: one batch of up to 4 (a 2x2 gallery)
    # with any fast-sampling option (leffa.sampling) the steps may go down to this
    fast_steps_min: int = 4
    cache_interval_max: int = 10

    def steps_min_for(self, fast_sampling: bool) -> int:
        """The fewest steps allowed: ``steps_min`` with the model's own sampling, ``fast_steps_min``
        with any fast-sampling option."""
        return min(self.steps_min, self.fast_steps_min) if fast_sampling else self.steps_min

    def check(self, options: GenerateOptions, names: OptionNames = API_NAMES) -> GenerateOptions:
        """``options`` with their types and ranges checked (API callers bypass the sliders and the
        handlers get the values unconverted; the command line's numbers are any ints and floats),
        whole numbers as ``int``; one ``OptionError`` lists every problem, each named by ``names``."""
        with OptionCheck() as check:
            return self.checked(options, check, names)

    def options(self, values: Mapping[str, Any], check: OptionCheck) -> GenerateOptions:
        """The generation options among an endpoint's raw values, by parameter name (``steps``,
        ``guidance``, ``seed``, ``random_seed``, ``ref_acceleration``, ``record``, the focus's
        ``focus``, ``focus_levels``, ``focus_start``, ``focus_end`` and, where the endpoint has it,
        ``repaint``; ``samples``, 1 when an older caller sends none), checked into ``check``."""
        random_seed = check.flag("random_seed", values["random_seed"])
        sampler = values.get("sampler", MODEL_SAMPLER)  # the sampling options: appended last, optional
        raw = GenerateOptions(values["steps"], values["guidance"], None if random_seed is True else values["seed"],
                              values["ref_acceleration"], values.get("repaint", False), values["record"],
                              samples=values.get("samples", 1),
                              sampler=None if sampler in (None, MODEL_SAMPLER) else sampler,
                              guidance_interval=(values.get("guidance_start", 0.0), values.get("guidance_end", 1.0)),
                              cache_interval=values.get("cache_interval", 1))
        checked = self.checked(raw, check)
        checked.attention_focus = self._focus(values, check)
        return checked

    def _focus(self, values: Mapping[str, Any], check: OptionCheck) -> AttentionFocus | None:
        """The experimental attention focus within the sliders' ranges, None when ``focus`` is 1
        (which changes nothing)."""
        temperature = check.number("focus", values["focus"], self.focus_min, self.focus_max)
        levels = check.integer("focus_levels", values["focus_levels"], 1, self.focus_levels_max)
        steps = (check.number("focus_start", values["focus_start"], 0.0, 1.0),
                 check.number("focus_end", values["focus_end"], 0.0, 1.0))
        if check.problems or temperature == 1.0:
            return None
        return attention_focus(check, temperature, levels, steps, names=API_NAMES)

    def checked(self, options: GenerateOptions, check: OptionCheck, names: OptionNames = API_NAMES) -> GenerateOptions:
        """``options`` checked into ``check`` (see ``check``)."""
        rescale = options.guidance_rescale
        samples = check.integer(names.samples, options.samples, 1, self.samples_max)
        sampler = None if options.sampler is None else check.choice(names.sampler, Sampler, options.sampler)
        interval = self._guidance_interval(options.guidance_interval, check, names)
        # sample k is drawn with seed + k: the last seed must be a seed too
        last_seed = self.seed_max - (samples - 1 if isinstance(samples, int) and 1 <= samples else 0)
        return replace(
            options,
            steps=self._steps(options, check, names),
            guidance_scale=check.number(names.guidance, options.guidance_scale, self.guidance_min, self.guidance_max),
            seed=None if options.seed is None else check.integer(names.seed, options.seed, 0, last_seed),
            samples=samples,
            sampler=sampler,
            guidance_interval=interval,
            cache_interval=check.integer(names.cache_interval, options.cache_interval, 1, self.cache_interval_max),
            ref_acceleration=check.flag(names.ref_acceleration, options.ref_acceleration),
            repaint=check.flag(names.repaint, options.repaint),
            record_attention=check.flag(names.record, options.record_attention),
            # rescaled CFG: off (0) up to the guidance scale's own range (the published default equals it)
            guidance_rescale=None if rescale is None else check.number(names.guidance_rescale, rescale, 0.0,
                                                                       self.guidance_max))

    def _steps(self, options: GenerateOptions, check: OptionCheck, names: OptionNames) -> int:
        low = self.steps_min_for(options.fast_sampling)
        problems = len(check.problems)
        steps = check.integer(names.steps, options.steps, low, self.steps_max)
        if len(check.problems) > problems and low > self.fast_steps_min and isinstance(steps, int) and steps < low:
            check.problems[-1] += (f" with the published sampling (from {self.fast_steps_min} with a fast-sampling "
                                   f"option: {names.sampler}, {names.guidance_interval} or {names.cache_interval})")
        return steps

    @staticmethod
    def _guidance_interval(interval: Any, check: OptionCheck, names: OptionNames) -> tuple[float, float]:
        try:
            start, end = interval
            checked = GuidanceInterval(start, end)
        except OptionError as e:
            check.problems.append(f"{names.guidance_interval}: {e}")
            return interval
        except (TypeError, ValueError):
            check.problems.append(f"{names.guidance_interval} must be two fractions, got {_shown(interval)}")
            return interval
        return checked.start, checked.end


MODEL_LIMITS = OptionLimits()  # the published Leffa models
# MCLD (configs/inference: 20 DDIM steps, guidance 3.5); fewer steps than Leffa's 30 are its published setting
MCLD_LIMITS = OptionLimits(steps_min=10, steps_default=20, guidance_min=1.0, guidance_max=10.0, guidance_default=3.5,
                           fast_steps_min=10)  # its own DDIM only
TINY_LIMITS = OptionLimits(steps_min=1, steps_default=4)  # the untrained --tiny model: a few steps are enough
# an own checkpoint (--checkpoint: a model being trained or tried): any number of steps
CHECKPOINT_LIMITS = OptionLimits(steps_min=1, steps_max=None)
