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


API_NAMES = OptionNames()
CLI_NAMES = OptionNames("--steps", "--guidance-scale", "--guidance-rescale", "--seed", "--ref-acceleration",
                        "--repaint", "--record", "--attention-focus", "--focus-steps", "--samples")


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
        raw = GenerateOptions(values["steps"], values["guidance"], None if random_seed is True else values["seed"],
                              values["ref_acceleration"], values.get("repaint", False), values["record"],
                              samples=values.get("samples", 1))
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
        # sample k is drawn with seed + k: the last seed must be a seed too
        last_seed = self.seed_max - (samples - 1 if isinstance(samples, int) and 1 <= samples else 0)
        return replace(
            options,
            steps=check.integer(names.steps, options.steps, self.steps_min, self.steps_max),
            guidance_scale=check.number(names.guidance, options.guidance_scale, self.guidance_min, self.guidance_max),
            seed=None if options.seed is None else check.integer(names.seed, options.seed, 0, last_seed),
            samples=samples,
            ref_acceleration=check.flag(names.ref_acceleration, options.ref_acceleration),
            repaint=check.flag(names.repaint, options.repaint),
            record_attention=check.flag(names.record, options.record_attention),
            # rescaled CFG: off (0) up to the guidance scale's own range (the published default equals it)
            guidance_rescale=None if rescale is None else check.number(names.guidance_rescale, rescale, 0.0,
                                                                       self.guidance_max))


MODEL_LIMITS = OptionLimits()  # the published Leffa models
# MCLD (configs/inference: 20 DDIM steps, guidance 3.5); fewer steps than Leffa's 30 are its published setting
MCLD_LIMITS = OptionLimits(steps_min=10, steps_default=20, guidance_min=1.0, guidance_max=10.0, guidance_default=3.5)
TINY_LIMITS = OptionLimits(steps_min=1, steps_default=4)  # the untrained --tiny model: a few steps are enough
# an own checkpoint (--checkpoint: a model being trained or tried): any number of steps
CHECKPOINT_LIMITS = OptionLimits(steps_min=1, steps_max=None)
