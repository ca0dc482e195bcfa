"""App settings: command-line flags, each defaulting to an environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from runtime.presets import DTYPE_NAMES, MEMORY_PRESETS

DTYPES = ("auto", *DTYPE_NAMES)  # auto: float16 on CUDA, float32 on the CPU (runtime.devices)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    checkpoint_dir: str | None = None  # None: $LEFFA_CHECKPOINT_DIR or ./ckpts
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16
    queue_size: int = 16  # requests waiting at most; more are refused with a message
    max_models: int = 2  # Leffa models kept loaded at most; the least recently used is dropped first
    memory: str = "fast"  # memory preset (runtime.presets): fast, balanced, low, low-fp8
    fuse_qkv: bool = False  # speed options (runtime.speed)
    channels_last: bool = False
    compile: bool = False
    max_file_size: str = "20mb"
    tiny: bool = False  # tiny random-weight models and stand-in preprocessors (no downloads)
    share: bool = False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") == "1"


def _env(name: str, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return type(default)(value) if default is not None else value


def parse_args(argv: list[str] | None = None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(description="Leffa virtual try-on and pose transfer web app")
    p.add_argument("--host", default=_env("LEFFA_HOST", _env("GRADIO_SERVER_NAME", d.host)),
                   help="address to listen on ($LEFFA_HOST or $GRADIO_SERVER_NAME; 0.0.0.0 to serve your network)")
    p.add_argument("--port", type=int, default=_env("LEFFA_PORT", _env("GRADIO_SERVER_PORT", d.port)),
                   help="port ($LEFFA_PORT or $GRADIO_SERVER_PORT, default 7860)")
    p.add_argument("--checkpoint-dir", default=_env("LEFFA_CHECKPOINT_DIR", d.checkpoint_dir),
                   help="weights folder laid out like the Hub repo ($LEFFA_CHECKPOINT_DIR, default ./ckpts)")
    p.add_argument("--device", default=_env("LEFFA_DEVICE", d.device), help="auto, cpu, cuda, cuda:N ($LEFFA_DEVICE)")
    p.add_argument("--dtype", default=_env("LEFFA_DTYPE", d.dtype),
                   choices=DTYPES, help="model dtype ($LEFFA_DTYPE)")
    p.add_argument("--queue-size", type=int, default=_env("LEFFA_QUEUE_SIZE", d.queue_size),
                   help="how many requests may wait ($LEFFA_QUEUE_SIZE, default 16)")
    p.add_argument("--max-models", type=int, default=_env("LEFFA_MAX_MODELS", d.max_models),
                   help="Leffa models kept in memory, least recently used dropped first ($LEFFA_MAX_MODELS)")
    p.add_argument("--memory", default=_env("LEFFA_MEMORY", d.memory), choices=MEMORY_PRESETS,
                   help="where the weights live while generating ($LEFFA_MEMORY): fast = all on the GPU; "
                        "balanced = only what the current phase runs; low = one UNet block at a time; "
                        "low-fp8 = low with float8 weights (least memory, slightly different images)")
    p.add_argument("--fuse-qkv", action="store_true", default=_env_flag("LEFFA_FUSE_QKV"),
                   help="fused q/k/v projections in self-attention ($LEFFA_FUSE_QKV=1)")
    p.add_argument("--channels-last", action="store_true", default=_env_flag("LEFFA_CHANNELS_LAST"),
                   help="channels-last convolutions ($LEFFA_CHANNELS_LAST=1)")
    p.add_argument("--compile", action="store_true", default=_env_flag("LEFFA_COMPILE"),
                   help="torch.compile the generative UNet: faster steps after a slow first generation "
                        "($LEFFA_COMPILE=1)")
    p.add_argument("--max-file-size", default=_env("LEFFA_MAX_FILE_SIZE", d.max_file_size),
                   help="largest upload ($LEFFA_MAX_FILE_SIZE, default 20mb)")
    p.add_argument("--tiny", action="store_true", default=_env_flag("LEFFA_TINY"),
                   help="offline demo: tiny untrained models and stand-in preprocessors ($LEFFA_TINY=1)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    a = p.parse_args(argv)
    if a.queue_size < 1 or a.max_models < 1:
        p.error("--queue-size and --max-models must be at least 1")
    # a default from the environment skips argparse's choices
    for flag, env, value, choices in (("--dtype", "LEFFA_DTYPE", a.dtype, DTYPES),
                                      ("--memory", "LEFFA_MEMORY", a.memory, MEMORY_PRESETS)):
        if value not in choices:
            p.error(f"{flag} / ${env} must be one of {', '.join(choices)}, got {value!r}")
    return Settings(a.host, a.port, a.checkpoint_dir, a.device, a.dtype, a.queue_size, a.max_models,
                    memory=a.memory, fuse_qkv=a.fuse_qkv, channels_last=a.channels_last, compile=a.compile,
                    max_file_size=a.max_file_size, tiny=a.tiny, share=a.share)
