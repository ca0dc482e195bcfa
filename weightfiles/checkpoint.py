"""Reading and strictly checking state-dict files (.pth, .safetensors)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from errors import UserError

SHOW = 5  # how many offending keys an error message names


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


REDOWNLOAD = ("delete it and download it again (`leffa check` lists the missing files of each task; "
              "`leffa download TASK` fetches them)")


def unreadable(path: str | Path, what: str, error: BaseException, expected: str) -> CheckpointError:
    """The error for a weight file that cannot be read: names the file and what to do."""
    return CheckpointError(f"{path}: cannot read {what} ({type(error).__name__}: {error}). The file is "
                           f"truncated, corrupt or not {expected}; {REDOWNLOAD}.")


def _weights_only_failure(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """torch's ``weights_only`` refusal without its advice to load unsafely: for a file holding
    other Python objects, or for bytes that are not a pickle at all."""
    detail = str(error).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
    if "Unsupported global" not in detail:
        return unreadable(path, "checkpoint", pickle.UnpicklingError(detail), "a state dict")
    return CheckpointError(
        f"{path}: refused to load: the file holds Python objects besides tensors ({detail}), and "
        "unpickling them could run code. Use a plain state dict (saved with `torch.save(model.state_dict(), "
        "...)`) or a .safetensors file; if this is a published file, it is corrupt: " + REDOWNLOAD + ".")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a plain state dict from ``.pth``/``.pt``/``.bin`` (``weights_only``) or ``.safetensors``.

    Tensors are memory-mapped where the format allows, so nothing is copied yet.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in {".pth", ".pt", ".bin", ".safetensors"}:
        raise CheckpointError(f"{path}: unsupported checkpoint format {suffix!r} (use .pth or .safetensors)")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _weights_only_failure(path, e) from None
    except Exception as e:  # noqa: BLE001 - every reader failure means the same to the user
        raise unreadable(path, "checkpoint", e, "a state dict") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a plain state dict (a dict of tensors)")
    return dict(state)


def check_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     source: str | Path) -> None:
    """Raise ``CheckpointError`` naming the first missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - SHOW} more)" if len(items) > SHOW else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:SHOW])}{more}")
    if problems:
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(problems))


def assign_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``module`` strictly, assigning its tensors (no second copy: a module built on
    the ``meta`` device takes the file's, memory-mapped): names and shapes checked first
    (``check_state_dict``), and no parameter or buffer left on ``meta``."""
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a buffer not in the checkpoint would stay on meta
        raise RuntimeError(f"{source}: no values loaded for {left[:5]}")
