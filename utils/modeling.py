"""Build a classifier by timm name and load starting weights into it.

``groupmamba_*`` names come from this repository's ``models`` package (importing it
registers them with timm) and take ``scan_backend``; any other timm name works too
(without pretrained downloads: weights come from a file).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import timm
import torch

import models
from utils.checkpoint import (CheckpointError, extract_state_dict, load_checkpoint,
                              load_weights_dropping_head)

SCAN_BACKENDS = ("auto", "torch", "triton", "cuda")


class ModelConfigError(ValueError):
    """An unknown model name or arguments the model does not take."""


def is_groupmamba(name: str) -> bool:
    return name.lower().startswith("groupmamba")


def set_scan_backend(backend: Optional[str]) -> None:
    """Export GROUPMAMBA_SCAN_BACKEND so every GroupMamba module built later sees it."""
    if backend:
        if backend not in SCAN_BACKENDS:
            raise ValueError(f"scan backend must be one of {SCAN_BACKENDS}, not {backend!r}")
        os.environ["GROUPMAMBA_SCAN_BACKEND"] = backend


def check_model_name(name: str) -> None:
    """Raise ModelConfigError unless timm knows ``name``."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        raise ModelConfigError(f"unknown model {name!r}"
                               + (f"; similar names: {', '.join(close)}" if close else
                                  " (any timm model name, or groupmamba_tiny/small/base)"))


def create_model(name: str, model_kwargs: Mapping[str, Any],
                 scan_backend: Optional[str] = None) -> torch.nn.Module:
    """``timm.create_model(name, **model_kwargs)``, plus ``scan_backend`` for GroupMamba."""
    check_model_name(name)
    kwargs = dict(model_kwargs)
    if is_groupmamba(name) and scan_backend:
        kwargs["scan_backend"] = scan_backend
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ModelConfigError(f"model {name!r} does not accept {sorted(kwargs)}: "
                               f"{exc}") from exc


def model_kwargs_for(name: str, num_classes: int, drop_path: float) -> dict:
    """The kwargs recorded in checkpoints and passed to ``create_model``."""
    kwargs: dict[str, Any] = {"num_classes": int(num_classes)}
    if drop_path > 0:
        kwargs["drop_path_rate"] = float(drop_path)
    return kwargs


def describe_model(model: torch.nn.Module, kwargs: Mapping[str, Any]) -> dict:
    """Add the model's own config flags (e.g. GroupMamba's ``distillation``)."""
    kwargs = dict(kwargs)
    distillation = getattr(model, "distillation", None)
    if isinstance(distillation, bool):
        kwargs["distillation"] = distillation
    return kwargs


def load_pretrained(model: torch.nn.Module, name: str, path: str) -> str:
    """Starting weights from an official release file or one of our checkpoints; the
    head is re-initialised when the class count differs. Returns a log line."""
    if is_groupmamba(name):
        try:
            result = models.load_pretrained(model, path)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot load {path} into {name}: {exc}") from exc
        return f"loaded pretrained weights from {path}" + (f" ({result})" if result else "")
    ckpt = load_checkpoint(path)
    state = extract_state_dict(ckpt)
    dropped = load_weights_dropping_head(model, state, source=str(path))
    note = f"; head re-initialised ({', '.join(dropped)})" if dropped else ""
    return f"loaded pretrained weights from {path}{note}"


def load_for_inference(model: torch.nn.Module, state_dict: Mapping[str, Any],
                       source: str) -> None:
    """Strict load with a readable error when the weights do not fit the model."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(f"weights in {source} do not match the model they describe: "
                              + " ".join(lines[:4])[:800]) from exc


def compile_blocks(model: torch.nn.Module, stage_norms: bool = False,
                   pad_matmuls: bool | None = None, **compile_kwargs) -> list[str]:
    """Regional compilation: ``torch.compile`` each repeated block in place.

    Compiling the whole model traces every block separately; compiling the block
    class instead lets blocks of one shape share one compiled graph (parameters are
    graph inputs), so compile time grows with the number of distinct block shapes,
    not the depth. For GroupMamba the regions are the stem, the downsampling layers,
    the GroupMambaBlocks and the ClassBlock; for other timm models, the members of
    ``blocks``/``stages`` lists, or the whole model when it has neither. Compiled in
    place: state-dict keys do not change (no ``_orig_mod.`` prefix), and a copy made
    later (an EMA) is compiled too. Returns the names of the compiled modules.

    Two options:

    - ``pad_matmuls`` (inductor only; None, the default: pad unless a ``mode`` is given,
      as torch.compile takes a mode or options, not both): pad every matmul whose
      sizes are not multiples of 8 (bf16) instead of letting inductor time each case
      while compiling. GroupMamba-T's stage 3 is 348 channels wide: unpadded, cuBLAS has
      only slow sm80 ``align2`` kernels for those GEMMs, and inductor's timing left some
      of them unpadded, differently from run to run. On an H200: 73.2 -> 69.8 ms a
      training step, 44.5 -> 41.3 ms an inference step; a cold time-to-accuracy run
      with it trained as before (94.6 % val ACC1 within 300 s; bench/RESULTS.md,
      eleventh session).
    - ``stage_norms`` (off, experimental): GroupMamba's StageEnds (the LayerNorm that
      ends a stage) as regions too; eager autocast runs those norms as a float32 copy
      plus ATen's float32 kernels (~1.4 ms of a 73 ms training step on an H200). One
      compiled step matches eager code on an H200 (tests/test_models_gpu.py), but both
      training runs with it and train.py's CUDA-graph-captured step diverged (gradient
      norms ~1e6, 70.7 % and 46.0 % val ACC1; bench/RESULTS.md, eleventh session), so it
      stays off until that is explained.
    """
    if pad_matmuls is None:
        pad_matmuls = "mode" not in compile_kwargs
    if pad_matmuls and compile_kwargs.get("backend", "inductor") == "inductor":
        if "mode" in compile_kwargs:
            raise ValueError("pad_matmuls is an inductor option, and torch.compile takes a mode "
                             f"or options, not both (mode={compile_kwargs['mode']!r})")
        compile_kwargs["options"] = {"force_shape_pad": True, **compile_kwargs.get("options", {})}
    from models.groupmamba import ClassBlock, Downsample, GroupMambaBlock, StageEnd, Stem
    regions = (GroupMambaBlock, ClassBlock, Stem, Downsample) + ((StageEnd,) if stage_norms else ())
    compiled = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in compiled):
            continue  # inside a region already compiled (e.g. stages.0.blocks.1)
        in_block_list = name.rsplit(".", 1)[-1].isdigit() and name.split(".")[-2:-1] in (["blocks"], ["stages"])
        if isinstance(module, regions) or in_block_list:
            module.compile(**compile_kwargs)
            compiled.append(name)
    if not compiled:
        model.compile(**compile_kwargs)
        compiled.append("")
    return compiled


# torch's dynamo_timed totals: whole-frame compiles (tracing, AOT autograd and the
# forward graphs), the backward graphs (compiled at the first backward) and, inside
# both, the wait for the Triton kernels built in worker processes
_COMPILE_PHASES = {"_compile.compile_inner": "frames",
                   "backward._backward_impl": "backward",
                   "async_compile.wait": "kernel_builds"}


def compile_seconds() -> dict[str, float]:
    """Seconds spent compiling in this process so far, by phase (see _COMPILE_PHASES);
    empty when this torch does not report them."""
    try:
        from torch._dynamo.utils import compile_times
        headers, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # a private API: a torch without it just gets no figures
        return {}
    totals = dict(zip(headers, values))
    return {name: float(totals[key]) for key, name in _COMPILE_PHASES.items()
            if key in totals}


def describe_compile_seconds(seconds: dict[str, float]) -> str:
    """A log line's worth of :func:`compile_seconds`."""
    if not seconds:
        return "no compile times reported"
    total = seconds.get("frames", 0.0) + seconds.get("backward", 0.0)
    return (f"{total:.1f} s compiling ({seconds.get('frames', 0.0):.1f} s tracing and "
            f"forward graphs, {seconds.get('backward', 0.0):.1f} s backward graphs; "
            f"{seconds.get('kernel_builds', 0.0):.1f} s of it waiting for Triton kernel builds)")
