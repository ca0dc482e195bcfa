"""Dataset-scale generation (``leffa infer``): a split of VITON-HD, DressCode or DeepFashion
generated with a model, as papers do, in one process or many through Accelerate::

    leffa infer --dataset data/VITON-HD --layout viton_hd --out results/vitonhd-paired
    accelerate launch --num_processes 8 -m leffa infer ...      # several GPUs / nodes

Inputs: the dataset's own agnostic masks and DensePose images (``training.datasets`` layouts), as
the papers use them, or our preprocessing of the photos (``InputSource.PREPROCESS``: the demo
pipeline, ``preprocess.inputs.Preprocessor``).

Output names (one flat folder of PNGs), so that evaluation pairs every image with its ground truth
by name without extension:

- try-on (VITON-HD, DressCode), paired and unpaired: ``{person}.png``, the name of the person image
  (``00006_00.jpg`` -> ``00006_00.png``), as CatVTON's and IDM-VTON's scripts name them. The ground
  truth of a paired image is the dataset's person image (``test/image/00006_00.jpg``,
  ``{category}/images/013563_0.jpg``). A pairs file that lists a person twice is refused.
- pose transfer (DeepFashion): ``{source}___{target}.png``, both without extension (PATN's
  ``{from}___{to}`` names: a target appears with several sources); the ground truth is the target
  image (``test/images/{target}.jpg``), the text after ``___``. MCLD's images are its 352×512
  pictures (their ``test.py``'s 512-high results), from MCLD's prepared folder (the
  ``deepfashion_mcld`` layout, ``training/mcld_data.py``) or, with our preprocessing, from the
  photos of either DeepFashion layout.

Seeds: the sample named ``name`` (its output name without extension) draws all its noise from
``torch.Generator().manual_seed(sample_seed(seed, name))``, so its image does not depend on the
process, the order or the batch that generated it (batches of other sizes may differ by float
rounding).

Resuming: an image already in the folder is skipped (images are written atomically: one that
exists is complete). ``leffa_infer.json`` in the folder holds the settings (written at the start)
and the summary (at the end); a folder of images made with other settings is refused.

Processes: sample ``i`` of the list belongs to process ``i mod N`` (striding over the whole list, so
the split depends neither on what is done already nor on each node's view of the folder); each
process writes its own images and the main process writes the summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from engine import inputs as model_inputs
from engine import registry
from engine.options import CLI_NAMES, GenerateOptions, SamplingPreset, with_sampling
from engine.registry import ModelEntry, Task
from engine.service import Engine
from engine.setup import ModelSetup, WeightSource
from errors import OptionError, enum_option
from leffa.attention import AttentionFocus
from preprocess.images import MODEL_SIZE, save_image_atomic
from preprocess.masks import GarmentType, TryOnModel
from runtime.devices import resolve_device
from runtime.sampling import Sampler
from runtime.image_tensors import image_to_tensor, mask_to_tensor
from mcld.inputs import sample_tensors
from training.datasets import DatasetError, DatasetLayout, LeffaDataset, Sample
from training.mcld_data import MCLDPairs, PairSample

MANIFEST = "leffa_infer.json"
# settings that do not change the images (a resumed run may change them)
RUN_ONLY = {"out_dir", "checkpoint_dir", "batch_size", "num_workers", "limit", "device", "dtype"}
# each layout's published model: the try-on model trained on it (its preprocessing), or pose transfer
LAYOUT_VARIANT = {DatasetLayout.VITON_HD: TryOnModel.VITON_HD, DatasetLayout.DRESS_CODE: TryOnModel.DRESS_CODE}
POSE_LAYOUTS = (DatasetLayout.DEEPFASHION, DatasetLayout.DEEPFASHION_MCLD)
MCLD_MODEL = "mcld"  # the deepfashion_mcld layout's model (its files are MCLD's inputs)


class InputSource(str, Enum):
    """Where the masks and DensePose images come from."""

    DATASET = "dataset"  # the dataset's own files, as the papers
    PREPROCESS = "preprocess"  # our preprocessing of the photos (the demo pipeline)


def _json_value(value):
    if dataclasses.is_dataclass(value):
        return {k: _json_value(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class InferenceConfig:
    data_root: Path
    layout: DatasetLayout
    out_dir: Path
    split: str = "test"
    paired: bool = True  # try-on: each person wears its own garment; False: the pairs file's garment
    pairs_file: Path | None = None  # instead of {split}_pairs.txt (see training.datasets)
    model: str | None = None  # a registry entry's name (engine.registry); None: the layout's published model
    checkpoint: Path | None = None  # an own .pth/.safetensors instead of the published weights
    base_config: Path | None = None  # for checkpoint: {unet,vae,scheduler}/ (default: the model's)
    checkpoint_dir: Path | None = None
    revision: str | None = None
    tiny: bool = False  # the tiny untrained model and stand-in preprocessing (offline trial)
    inputs: InputSource = InputSource.DATASET
    steps: int | None = None  # None: the model's default (its registry entry's limits)
    guidance_scale: float | None = None  # None: the model's default
    guidance_rescale: float | None = None  # None: the guidance scale, as the published weights
    ref_acceleration: bool = False
    repaint: bool = False
    seed: int = 42
    attention_focus: AttentionFocus | None = None  # experimental (leffa.attention.AttentionFocus)
    # fast sampling (leffa.sampling): a preset, then the values given over it (None: not given)
    sampling: SamplingPreset | None = None
    sampler: Sampler | None = None
    guidance_interval: tuple[float, float] | None = None
    cache_interval: int | None = None
    size: tuple[int, int] = MODEL_SIZE  # (width, height)
    batch_size: int = 1
    num_workers: int = 2  # data-loading workers per process (dataset inputs only)
    limit: int | None = None  # only the first N samples of the list
    device: str = "auto"  # auto: Accelerate's device for the process
    dtype: torch.dtype | str | None = None  # None: float16 on CUDA, float32 on CPU

    def __post_init__(self):
        for name, cls in (("layout", DatasetLayout), ("inputs", InputSource)):
            object.__setattr__(self, name, enum_option(cls, getattr(self, name), name))
        if self.model is not None:
            object.__setattr__(self, "model", registry.entry(self.model).name)
        for name in ("data_root", "out_dir", "pairs_file", "checkpoint", "base_config", "checkpoint_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    @property
    def entry(self) -> ModelEntry:
        if self.model is not None:
            return registry.entry(self.model)
        if self.layout is DatasetLayout.DEEPFASHION_MCLD:
            return registry.pose_entry(MCLD_MODEL)
        variant = LAYOUT_VARIANT.get(self.layout)
        return registry.pose_entry() if variant is None else registry.tryon_entry(variant)

    @property
    def source(self) -> WeightSource:
        return WeightSource(self.checkpoint_dir, self.revision, self.tiny, self.checkpoint, self.base_config)

    @property
    def options(self) -> GenerateOptions:
        """The generation options (checked against the model's limits by ``Engine.check``)."""
        limits = self.source.limits(self.entry)
        options = GenerateOptions(limits.steps_default,
                                  limits.guidance_default if self.guidance_scale is None else self.guidance_scale,
                                  self.seed, self.ref_acceleration, self.repaint,
                                  False, self.attention_focus, self.guidance_rescale)
        return with_sampling(options, self.sampling, steps=self.steps, sampler=self.sampler,
                             guidance_interval=self.guidance_interval, cache_interval=self.cache_interval,
                             preset_name="sampling")

    def check(self) -> None:
        """``OptionError`` for settings that cannot work together."""
        w, h = self.size
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise OptionError("--batch-size and --limit must be at least 1")
        if self.num_workers < 0:
            raise OptionError("--num-workers must be at least 0")
        if w <= 0 or h <= 0 or w % 8 or h % 8:
            raise OptionError(f"width and height must be positive multiples of 8, got {w}x{h}")
        pose_layout = self.layout in POSE_LAYOUTS
        if pose_layout != (self.entry.task is Task.POSE):
            raise OptionError(f"the {self.entry.name} model does not fit the {self.layout.value} layout: "
                              "pose transfer goes with deepfashion, try-on with viton_hd or dress_code")
        appearance = model_inputs.needs_appearance(self.entry)
        if (pose_layout and self.inputs is InputSource.DATASET
                and (self.layout is DatasetLayout.DEEPFASHION_MCLD) != appearance):
            raise OptionError(f"the {self.entry.name} model does not fit the {self.layout.value} layout's files: "
                              "MCLD reads the deepfashion_mcld layout (or any DeepFashion photos with --preprocess), "
                              "Leffa the deepfashion layout")
        if pose_layout and not self.paired:
            raise OptionError("DeepFashion has one setting (source -> target pairs): drop --unpaired")
        if appearance and self.size != MODEL_SIZE:
            raise OptionError(f"{self.entry.name} generates at its own size: drop --size")
        if self.inputs is InputSource.PREPROCESS and self.size != MODEL_SIZE:
            raise OptionError("our preprocessing works at 768x1024: drop --size, or use the dataset's inputs")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OptionError(f"--out {self.out_dir} is a file, not a folder")

    def settings(self) -> dict:
        """What the images depend on, as JSON values (recorded in the manifest; a resumed run must
        match it). The dtype is added once the device is known."""
        # without a focus, as manifests written before the option existed (their runs resume)
        fields = [f.name for f in dataclasses.fields(self)
                  if f.name not in RUN_ONLY and not (f.name == "attention_focus" and self.attention_focus is None)]
        options = self.options  # the steps and guidance as run (the model's defaults when not given)
        return {**{name: _json_value(getattr(self, name)) for name in fields}, "model": self.entry.name,
                "steps": options.steps, "guidance_scale": options.guidance_scale}


@dataclass(frozen=True)
class ProcessStats:
    process: int
    generated: int
    skipped: int  # its images already in the folder
    seconds: float  # its generation loop (data loading included, model loading not)

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class InferenceSummary:
    out_dir: Path
    manifest: Path
    total: int  # samples in the list
    generated: int
    skipped: int
    seconds: float  # wall time of the whole run
    processes: tuple[ProcessStats, ...]

    def to_json(self) -> dict:
        return {"total": self.total, "generated": self.generated, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "processes": [
                    {**dataclasses.asdict(p), "seconds": round(p.seconds, 3),
                     "images_per_second": round(p.images_per_second, 4)} for p in self.processes]}


def sample_seed(seed: int, name: str) -> int:
    """The seed of sample ``name``: 63 bits of SHA-256 of ``"{seed}/{name}"``."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big") >> 1


def output_name(layout: DatasetLayout, sample: Sample | PairSample) -> str:
    """The file a sample's image is written to (see the module docstring)."""
    if isinstance(sample, PairSample):
        return f"{sample.source.stem}___{sample.target.stem}.png"
    if layout is DatasetLayout.DEEPFASHION:
        return f"{sample.reference.stem}___{sample.target.stem}.png"
    return f"{sample.target.stem}.png"


def _check_names(names: list[str]) -> None:
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise DatasetError(f"{len(twice)} output name(s) would be written twice, e.g. "
                           f"{', '.join(twice[:3])}: each person may appear once in the pairs file "
                           "(images are named after it)")


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON via a temporary file in the same folder: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _check_manifest(path: Path, settings: dict) -> None:
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise OptionError(f"{path} is not a leffa infer manifest: use another --out folder") from None
    changed = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in changed)
        raise OptionError(f"{path.parent} holds images made with other settings ({diff}): use another --out "
                          f"folder, or delete {path.name} to keep those images")


def _setup(cfg: InferenceConfig, accelerator) -> ModelSetup:
    """Accelerate's device for the process unless ``--device`` names one (one process only)."""
    if cfg.device != "auto" and accelerator.num_processes > 1:
        raise OptionError("leave --device at auto when launching several processes (each takes its own GPU)")
    device = resolve_device(cfg.device, auto=accelerator.device)
    if isinstance(cfg.dtype, torch.dtype):
        return ModelSetup(str(device), cfg.dtype)
    return ModelSetup.resolve(str(device), cfg.dtype)


class _Items(Dataset):
    """(index, the pipeline's four tensors) of the samples at ``indices``."""

    def __init__(self, indices: list[int], load: Callable[[int], dict[str, torch.Tensor]]):
        self.indices, self.load = indices, load

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return self.indices[k], self.load(self.indices[k])


class _Preprocessed:
    """A sample's inputs from our preprocessing of its photos (``InputSource.PREPROCESS``), through
    the engine's task dispatch (``engine.inputs``)."""

    def __init__(self, cfg: InferenceConfig, samples: list[Sample], engine: Engine):
        self.samples, self.entry, self.layout = samples, cfg.entry, cfg.layout
        self.preprocessor = lambda: engine.preprocessor

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        if model_inputs.needs_appearance(self.entry):  # MCLD: from the photos, fitted whole (DeepFashion is framed)
            source, target = (s.source, s.target) if isinstance(s, PairSample) else (s.reference, s.target)
            p = model_inputs.pose_inputs(self.preprocessor, self.entry, source, target)
            return sample_tensors(p.reference, p.appearance.texture, p.densepose, p.appearance.face_embedding)
        if self.entry.task is Task.POSE:
            p = model_inputs.pose_inputs(self.preprocessor, self.entry, s.reference, s.target)
            src, ref, mask, dense = p.target, p.reference, p.mask, p.densepose
        else:
            garment = (GarmentType(s.target.parent.parent.name) if self.layout is DatasetLayout.DRESS_CODE
                       else GarmentType.UPPER_BODY)
            t = model_inputs.tryon_inputs(self.preprocessor, self.entry, s.target, s.reference, garment)
            src, ref, mask, dense = t.person, t.garment, t.mask, t.densepose
        images = {"src_image": src, "ref_image": ref, "densepose": dense}
        return {**{k: image_to_tensor(v, k)[0] for k, v in images.items()}, "mask": mask_to_tensor(mask)[0]}


def _generate(cfg: InferenceConfig, engine: Engine, options: GenerateOptions, loader: DataLoader,
              names: list[str], bar: tqdm) -> None:
    """The model over ``loader``'s batches; each image is written (atomically) once made."""
    for indices, batch in loader:
        indices = indices.tolist()
        seeds = [sample_seed(cfg.seed, Path(names[i]).stem) for i in indices]
        generators = [torch.Generator().manual_seed(s) for s in seeds]  # one generator per sample
        images = engine.generate_batch(cfg.entry, batch, options, generators)
        for i, image in zip(indices, images):
            save_image_atomic(image, cfg.out_dir / names[i])
        bar.update(len(indices))


def infer(cfg: InferenceConfig, log: Callable[[str], None] = print) -> InferenceSummary:
    """Generate every sample of the split that is not in ``cfg.out_dir`` yet (this process's
    share of them); every process returns the summary of the whole run."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    t0 = time.perf_counter()
    cfg.check()
    accelerator = Accelerator()
    setup = _setup(cfg, accelerator)
    engine = Engine.create(setup, cfg.source)
    options = engine.check(cfg.entry, cfg.options, CLI_NAMES)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if not main:
        log = lambda *_: None  # noqa: E731 -- one process reports
    data = (MCLDPairs(cfg.data_root, cfg.split, cfg.pairs_file) if cfg.layout is DatasetLayout.DEEPFASHION_MCLD
            else LeffaDataset(cfg.layout, cfg.data_root, cfg.split, cfg.paired, cfg.size, cfg.pairs_file))
    samples = data.samples[:cfg.limit]
    names = [output_name(cfg.layout, s) for s in samples]
    _check_names(names)
    manifest = cfg.out_dir / MANIFEST
    settings = {**cfg.settings(), "dtype": str(setup.dtype).removeprefix("torch.")}
    _check_manifest(manifest, settings)
    accelerator.wait_for_everyone()  # every process has checked before the folder is written to
    if main:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(manifest, {"settings": settings, "summary": None})

    mine = range(rank, len(samples), world)
    pending = [i for i in mine if not (cfg.out_dir / names[i]).is_file()]
    done = len(mine) - len(pending)
    log(f"{len(samples)} samples ({cfg.layout.value}, {'paired' if cfg.paired else 'unpaired'}), "
        f"{world} process(es); this one: {len(pending)} to generate, {done} already there")
    ours = cfg.inputs is InputSource.PREPROCESS
    with accelerator.main_process_first():  # one download of missing weights
        engine.fetch(engine.request_files(cfg.entry, cfg.entry.analyses if ours else ()))
        engine.models.get(cfg.entry)
    load, workers = (_Preprocessed(cfg, samples, engine), 0) if ours else (data.__getitem__, cfg.num_workers)
    loader = DataLoader(_Items(pending, load), batch_size=cfg.batch_size, num_workers=workers)
    start = time.perf_counter()
    with tqdm(total=len(pending), unit="img", desc=f"process {rank}", disable=not main) as bar:
        _generate(cfg, engine, options, loader, names, bar)
    stats = ProcessStats(rank, len(pending), done, time.perf_counter() - start)

    everyone = tuple(sorted(gather_object([stats]), key=lambda p: p.process))
    summary = InferenceSummary(cfg.out_dir, manifest, len(samples), sum(p.generated for p in everyone),
                               sum(p.skipped for p in everyone), time.perf_counter() - t0, everyone)
    if main:
        _write_json(manifest, {"settings": settings, "summary": summary.to_json()})
    rates = ", ".join(f"{p.images_per_second:.3g}" for p in everyone)
    log(f"generated {summary.generated} images ({summary.skipped} already there) in {summary.seconds:.1f} s "
        f"(images/s per process: {rates}); summary in {manifest}")
    accelerator.wait_for_everyone()
    return summary
