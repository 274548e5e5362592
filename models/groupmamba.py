"""GroupMamba image classifiers (Shaker et al., "GroupMamba: Efficient Group-Based
Visual State Space Model", CVPR 2025), in timm's ``models/<family>.py`` layout:
blocks, the model, the checkpoint filter and loader, configs, registered variants.

Four stages of (downsample, GroupMamba blocks, LayerNorm); a class-attention style
``ClassBlock`` pools the last stage into one token; two linear heads (``head`` and
the DeiT-style ``dist_head``) read it. In training both logits are returned, in
evaluation their mean.

State-dict keys, shapes and the forward computation match the official release
(github.com/Amshaker/GroupMamba), so released checkpoints load with ``strict=True``.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from kernels import depthwise_conv, fused_norm, triton_runs_on

from ._helpers import apply_pretrained_cfg, checkpoint_cfg, filter_state_dict
from ._helpers import load_pretrained as load_checkpoint_weights
from .csms6s import SCAN_DIRECTIONS
from .ss2d import SS2D, can_batch, channels_last_weight, grouped_ss2d

__all__ = ["GroupMamba", "GroupMambaLayer", "PretrainedWeightsError", "StochasticDepth", "checkpoint_filter_fn"]

HEAD_NAMES = ("head", "dist_head")


# --------------------------------------------------------------------------- blocks

class Mlp(nn.Module):
    """Two-layer GELU MLP on tokens (the ClassBlock's feed-forward)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DWConv(nn.Module):
    """3x3 depth-wise conv applied to ``(B, H*W, C)`` tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = channels_last_weight(nn.Conv2d(dim, dim, 3, 1, 1, groups=dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, channels = x.shape
        # a channels-last view: the conv keeps that layout, so the way back is free too
        grid = x.transpose(1, 2).view(batch, channels, height, width)
        return self.dwconv(grid).flatten(2).transpose(1, 2)


class ConvMlp(nn.Module):
    """PVT-v2 feed-forward: fc1, depth-wise conv, GELU, fc2.

    With ``fused_kernels`` on CUDA with Triton, the conv, GELU and fc2 run as one fused op
    (:mod:`kernels.depthwise_conv`) that keeps only fc1's output for the backward pass.
    """

    def __init__(self, in_features: int, hidden_features: int, fused_kernels: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.fused_kernels = fused_kernels

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        if self.fused_kernels and triton_runs_on(x):
            conv = self.dwconv.dwconv
            grid = x.view(x.shape[0], height, width, x.shape[-1])
            out = depthwise_conv.conv3x3_act_linear(grid, conv.weight, conv.bias, "gelu",
                                                    self.fc2.weight, self.fc2.bias)
            return out.view(x.shape[0], height * width, -1)
        x = self.act(self.dwconv(x, height, width))
        return self.fc2(x)


def _activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes ``x`` in: autocast's on CUDA, else ``x``'s own
    (what a fused op writes for a projection to read without another cast)."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype


def _layer_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.layer_norm`` returns for ``x``: float32 under CUDA autocast, else ``x``'s."""
    return torch.float32 if torch.is_autocast_enabled("cuda") else x.dtype


def _is_affine_layer_norm(norm: nn.Module) -> bool:
    return (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1
            and norm.weight is not None and norm.bias is not None)


class GroupMambaLayer(nn.Module):
    """The token mixer: four SS2D scans on four channel quarters, gated by channel affinity.

    LayerNorm; a squeeze/excite gate from the mean token; each quarter of the
    channels scanned in its own direction; the concatenation times ``skip_scale``
    times the normed input; the gate; the same LayerNorm again; a projection.

    Shapes: ``(B, H*W, C)`` -> ``(B, H*W, output_dim)``.
    """

    def __init__(self, input_dim: int, output_dim: int, d_state: int = 1, d_conv: int = 3,
                 expand: float = 1, reduction: int = 16, scan_backend: str = "auto", fused_kernels: bool = False):
        super().__init__()
        if input_dim % len(SCAN_DIRECTIONS):
            raise ValueError(f"GroupMambaLayer splits channels into {len(SCAN_DIRECTIONS)} groups; "
                             f"input_dim={input_dim} is not divisible by {len(SCAN_DIRECTIONS)}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        # Registration order reproduces the released state_dict order.
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.fc1 = nn.Linear(input_dim, input_dim // reduction)
        self.fc2 = nn.Linear(input_dim // reduction, output_dim)
        # the released models use a default-eps LayerNorm here, whatever norm_layer is
        self.norm = nn.LayerNorm(input_dim)
        group_dim = input_dim // len(SCAN_DIRECTIONS)
        for index, direction in enumerate(SCAN_DIRECTIONS, start=1):
            scan = SS2D(group_dim, d_state=d_state, ssm_ratio=expand, d_conv=d_conv,
                        direction=direction, scan_backend=scan_backend)
            self.add_module(f"mamba_g{index}", scan)
        self.proj = nn.Linear(input_dim, output_dim)
        # run the four SS2Ds as one batched pipeline (same result, a quarter of the
        # kernel launches); False runs them one by one as released, for comparison
        self.batch_groups = True
        # on CUDA, fused ops whose backward recomputes: the norm with the mean token,
        # in the batched pipeline the depth-wise conv + SiLU (kernels.depthwise_conv) and
        # the output norm with its gate, and the products with the LayerNorm before proj
        # (kernels.fused_norm)
        self.fused_kernels = fused_kernels

    def group_scans(self) -> list[SS2D]:
        return [getattr(self, f"mamba_g{index}") for index in range(1, len(SCAN_DIRECTIONS) + 1)]

    def channel_affinity(self, pooled: torch.Tensor) -> torch.Tensor:
        """Squeeze/excite gate from the mean token: ``(B, 1, C)`` -> ``(B, 1, output_dim)``."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))

    def scan_groups(self, grid: torch.Tensor) -> torch.Tensor:
        """Each channel quarter of ``(B, H, W, C)`` through its own SS2D, concatenated."""
        scans = self.group_scans()
        if self.batch_groups and can_batch(scans):
            return grouped_ss2d(scans, grid, fused=self.fused_kernels)
        groups = grid.chunk(len(scans), dim=-1)
        return torch.cat([scan(group) for scan, group in zip(scans, groups)], dim=-1)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if x.dtype == torch.float16:
            x = x.float()  # as released: fp16 activations enter the mixer in float32
        batch, tokens, channels = x.shape
        norm = self.norm
        fused = self.fused_kernels and triton_runs_on(x)
        if fused:  # the norm and its mean token in one kernel
            x, pooled = fused_norm.pooled_layer_norm(x, norm.weight, norm.bias, norm.eps, _layer_norm_dtype(x))
        else:
            x = norm(x)
            pooled = x.mean(dim=1, keepdim=True)
        gate = self.channel_affinity(pooled)
        mixed = self.scan_groups(x.view(batch, height, width, channels)).view(batch, tokens, channels)
        if fused:
            # the products and the LayerNorm in one kernel, written in the dtype the
            # projection computes in; its backward recomputes the products
            return self.proj(fused_norm.modulated_layer_norm(mixed, self.skip_scale, x, gate, norm.weight,
                                                             norm.bias, norm.eps, _activation_dtype(x)))
        # the release's order of products; folding skip_scale into the gate first saves
        # one full-size multiply but measurably loses float32 accuracy in skip_scale's gradient
        return self.proj(norm(mixed * self.skip_scale * x * gate))


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample with probability ``rate`` (training only).

    timm's ``DropPath`` in distribution (kept samples scaled by ``1 / (1 - rate)``), but
    the rate is a non-persistent buffer rather than a Python float: ``torch.compile``
    then treats it as an input, so blocks with different rates share one compiled
    graph (regional compilation) instead of recompiling per rate. No state-dict entry.
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
        self.register_buffer("rate", torch.tensor(float(rate)), persistent=False)
        self._rate_value = float(rate)  # for the eager shortcut and repr; compiled code reads the buffer

    def keep_factors(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Float32 ``(B,)``: 0 for a dropped sample, ``1 / (1 - rate)`` for a kept one;
        None where nothing is dropped (evaluation, rate 0)."""
        # is_compiling() first: a compiled graph must not guard on the per-block float
        if not self.training or (not torch.compiler.is_compiling() and self._rate_value == 0.0):
            return None
        keep = 1.0 - self.rate
        return (torch.rand((x.shape[0],), device=x.device, dtype=torch.float32) < keep) / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.keep_factors(x)
        if factors is None:
            return x
        return x * factors.view((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rate={self._rate_value:.3f}"


class GroupMambaBlock(nn.Module):
    """Pre-norm residual block: GroupMambaLayer (which norms its own input), then ConvMlp."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, scan_backend: str = "auto",
                 fused_kernels: bool = False):
        super().__init__()
        self.norm2 = norm_layer(dim)
        self.attn = GroupMambaLayer(dim, dim, scan_backend=scan_backend, fused_kernels=fused_kernels)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), fused_kernels=fused_kernels)
        self.drop_path = StochasticDepth(drop_path)
        # on CUDA, the residual sum and norm2 as one fused op (kernels.fused_norm)
        self.fused_kernels = fused_kernels

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        branch = self.attn(x, height, width)
        norm = self.norm2
        if self.fused_kernels and triton_runs_on(x) and _is_affine_layer_norm(norm):
            x, normed = fused_norm.residual_layer_norm(x, branch, self.drop_path.keep_factors(branch), norm.weight,
                                                       norm.bias, norm.eps, _activation_dtype(x))
        else:
            x = x + self.drop_path(branch)
            normed = norm(x)
        return x + self.drop_path(self.mlp(normed, height, width))


class ClassBlock(nn.Module):
    """Refines a pooled class token with a GroupMambaLayer (on a 1x1 grid) and an MLP.

    The released block receives ``[class token, patch tokens]`` but only ever reads
    and rewrites the class token, so this one takes and returns just that token,
    ``(B, 1, C)``; the result is the same without concatenating the patch tokens.
    """

    def __init__(self, dim: int, mlp_ratio: float, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 scan_backend: str = "auto", fused_kernels: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm2 = norm_layer(dim)
        self.attn = GroupMambaLayer(dim, dim, scan_backend=scan_backend, fused_kernels=fused_kernels)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, cls_token: torch.Tensor) -> torch.Tensor:
        cls_token = cls_token + self.norm1(self.attn(cls_token, 1, 1))
        return cls_token + self.mlp(self.norm2(cls_token))


def _to_tokens(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` plus the grid size."""
    height, width = x.shape[-2:]
    return x.flatten(2).transpose(1, 2), height, width


class Stem(nn.Module):
    """Three conv-BN-ReLU layers (the first with stride 2), then a stride-2 conv to tokens."""

    def __init__(self, in_chans: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)  # default eps in the release

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        # channels-last: with only stem_hidden_dim (32) channels, the NCHW BatchNorm
        # kernels run one block per channel (an H200 profile: 12 ms of a 97 ms step in
        # the three BatchNorms) and cuDNN converts every conv's input to NHWC; in this
        # layout both are fast, and the tokens below are a free view of the proj output
        x = x.contiguous(memory_format=torch.channels_last)
        tokens, height, width = _to_tokens(self.proj(self.conv(x)))
        return self.norm(tokens), height, width


class Downsample(nn.Module):
    """Stride-2 3x3 conv between stages, then LayerNorm on the tokens."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)  # default eps in the release

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        tokens, height, width = _to_tokens(self.proj(x))
        return self.norm(tokens), height, width


# --------------------------------------------------------------------------- model

def _init_weights(module: nn.Module) -> None:
    """The release's init, applied once over the whole model.

    SS2D's own parameters (x_proj_weight, dt_projs_*, A_logs, Ds) are bare
    Parameters, not Linear modules, so they keep the init SS2D gave them.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        return  # nothing to initialise on the meta device (shape-only builds)
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _drop_path_rates(drop_path_rate: float, count: int) -> list[float]:
    """Linearly increasing stochastic depth, 0 for the first block, ``drop_path_rate`` for the last."""
    if count <= 1:
        return [0.0] * count
    return [drop_path_rate * index / (count - 1) for index in range(count)]


class GroupMamba(nn.Module):
    """GroupMamba classifier.

    Args:
        in_chans: input image channels.
        num_classes: classes of ``head`` (and ``dist_head``); 0 gives identity heads.
        stem_hidden_dim: width of the stem's convs.
        embed_dims, mlp_ratios, depths: per stage; every embed dim divisible by 4.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        norm_layer: norm of the blocks' FFN input, the stage outputs and the ClassBlock.
        num_stages: number of stages (must match the per-stage lists).
        distillation: add ``dist_head``; training returns ``(head, dist_head)``
            logits, evaluation their mean.
        drop_rate: dropout before the heads (0 as released; the release accepted and
            ignored this argument).
        scan_backend: the selective scan of every layer, one of
            :data:`kernels.grid_scan.SCAN_BACKENDS`: ``"auto"`` (the grid scan on CUDA
            with Triton, the pure-PyTorch scan on the CPU), ``"grid"``, ``"triton"``,
            ``"cuda"`` or ``"torch"``.
        fused_kernels: on CUDA with Triton, run the depth-wise convs with their activation
            (and the feed-forward's fc2), the LayerNorms with the work around them (each
            mixer's mean token and products, its scans' output gates, each block's
            residual sum) as fused kernels whose backward recomputes what they skip
            keeping: the same numerics, about half the activation memory, and faster
            steps where a CUDA graph hides their launches (``bench/RESULTS.md``).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, stem_hidden_dim: int = 32,
                 embed_dims: Sequence[int] = (64, 128, 348, 448), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 drop_path_rate: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 depths: Sequence[int] = (3, 4, 6, 3), num_stages: int = 4, distillation: bool = True,
                 drop_rate: float = 0.0, scan_backend: str = "auto", fused_kernels: bool = False):
        super().__init__()
        self._check_arguments(num_classes, embed_dims, mlp_ratios, depths, num_stages)
        self.num_classes = num_classes
        self.num_stages = num_stages
        self.depths = list(depths)
        self.embed_dims = list(embed_dims)
        self.distillation = distillation
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False  # set_grad_checkpointing
        # one entry per stage for timm's features_only: the stem divides by 4, each downsample by 2
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** stage, module=f"block{stage + 1}")
                             for stage, dim in enumerate(embed_dims)]

        rates = _drop_path_rates(drop_path_rate, sum(depths))
        first_block = 0
        for stage in range(num_stages):
            if stage == 0:
                patch_embed = Stem(in_chans, stem_hidden_dim, embed_dims[0])
            else:
                patch_embed = Downsample(embed_dims[stage - 1], embed_dims[stage])
            blocks = nn.ModuleList([
                GroupMambaBlock(embed_dims[stage], mlp_ratios[stage], drop_path=rates[first_block + index],
                                norm_layer=norm_layer, scan_backend=scan_backend, fused_kernels=fused_kernels)
                for index in range(depths[stage])])
            first_block += depths[stage]
            # official attribute names, so released state_dict keys match
            self.add_module(f"patch_embed{stage + 1}", patch_embed)
            self.add_module(f"block{stage + 1}", blocks)
            self.add_module(f"norm{stage + 1}", norm_layer(embed_dims[stage]))

        self.post_network = nn.ModuleList([
            ClassBlock(embed_dims[-1], mlp_ratios[-1], norm_layer=norm_layer, scan_backend=scan_backend,
                       fused_kernels=fused_kernels)])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)
        if distillation:
            self.dist_head = self._make_head(num_classes)
        self.apply(_init_weights)

    @staticmethod
    def _check_arguments(num_classes, embed_dims, mlp_ratios, depths, num_stages) -> None:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        for name, values in (("embed_dims", embed_dims), ("mlp_ratios", mlp_ratios), ("depths", depths)):
            if len(values) != num_stages:
                raise ValueError(f"{name} needs one entry per stage ({num_stages}), got {list(values)}")
        bad_dims = [dim for dim in embed_dims if dim % len(SCAN_DIRECTIONS)]
        if bad_dims:
            raise ValueError(f"every embed dim must be divisible by {len(SCAN_DIRECTIONS)} "
                             f"(one channel group per scan direction), got {list(embed_dims)}")

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- timm model interface ------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of parameters to keep out of weight decay (the SSM's A_logs and Ds)."""
        return {name for name, param in self.named_parameters() if getattr(param, "_no_weight_decay", False)}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace ``head`` (and ``dist_head``) with freshly initialised ones for ``num_classes``.

        ``global_pool`` is accepted for timm compatibility; pooling is the ClassBlock's.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        device = self.norm1.weight.device
        for name in self._head_names():
            head = self._make_head(num_classes).to(device)
            head.apply(_init_weights)
            setattr(self, name, head)

    def _head_names(self) -> tuple[str, ...]:
        return HEAD_NAMES if self.distillation else HEAD_NAMES[:1]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: in training, keep only each GroupMambaBlock's input and recompute
        the block's activations in the backward (the same numerics, a fraction of the
        activation memory, one more forward of the blocks per step)."""
        self.grad_checkpointing = enable

    def _run_block(self, block: nn.Module, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # non-reentrant: the recomputation replays the block's stochastic depth draw
            # (the RNG state is restored) and frees each block's activations after its backward
            return checkpoint(block, x, height, width, use_reentrant=False)
        return block(x, height, width)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, H, W)`` -> normed class-token features ``(B, num_features)``."""
        for stage in range(1, self.num_stages + 1):
            x, height, width = getattr(self, f"patch_embed{stage}")(x)
            for block in getattr(self, f"block{stage}"):
                x = self._run_block(block, x, height, width)
            if stage < self.num_stages:
                x = getattr(self, f"norm{stage}")(x)
                # a channels-last view back to a map; the next conv keeps that layout
                x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
        cls_token = x.mean(dim=1, keepdim=True)
        for block in self.post_network:
            cls_token = block(cls_token)
        return getattr(self, f"norm{self.num_stages}")(cls_token[:, 0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = self.head_drop(x)
        if pre_logits:
            return x
        if not self.distillation:
            return self.head(x)
        logits, dist_logits = self.head(x), self.dist_head(x)
        if self.training:
            return logits, dist_logits
        return (logits + dist_logits) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    # -- timm feature extraction and weight files ------------------------------------

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature interface: the map of each stage in ``indices`` (None: all; an int
        n: the last n; a sequence: those stages, negative ones counted from the end), as
        ``(B, C, H, W)`` (``output_fmt="NCHW"``, channels-last in memory, as the network
        keeps them) or ``(B, H, W, C)`` (``"NHWC"``).

        A stage's map is what the next stage reads (normed by that stage's norm); the last
        stage's map gets the final norm (the one the class token gets) only with ``norm``.
        Returns the maps, or ``(the pooled, normed features, the maps)`` unless
        ``intermediates_only``; ``stop_early`` stops after the last stage taken (the
        features are then those of that stage).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be NCHW or NHWC, not {output_fmt!r}")
        take, last_taken = _stage_indices(self.num_stages, indices)
        stages = last_taken + 1 if stop_early or intermediates_only else self.num_stages
        maps = []
        for stage in range(stages):
            tokens, height, width = self._forward_stage(x, stage)
            if stage < len(self.feature_info) - 1:  # normed inside the network
                tokens = getattr(self, f"norm{stage + 1}")(tokens)
            grid = tokens.view(tokens.shape[0], height, width, -1)
            if stage in take:
                final_norm = norm and stage == len(self.feature_info) - 1
                taken = getattr(self, f"norm{stage + 1}")(grid) if final_norm else grid
                maps.append(taken.permute(0, 3, 1, 2) if output_fmt == "NCHW" else taken)
            x = grid.permute(0, 3, 1, 2)
        if intermediates_only:
            return maps
        cls_token = tokens.mean(dim=1, keepdim=True)
        for block in self.post_network if stages == self.num_stages else ():
            cls_token = block(cls_token)
        if stages == len(self.feature_info):  # the final norm, as forward_features applies it
            cls_token = getattr(self, f"norm{stages}")(cls_token)
        return cls_token[:, 0], maps

    def _forward_stage(self, x: torch.Tensor, stage: int) -> tuple[torch.Tensor, int, int]:
        """Stage ``stage`` (0-based) on a ``(B, C, H, W)`` map: its tokens before the stage norm."""
        x, height, width = getattr(self, f"patch_embed{stage + 1}")(x)
        for block in getattr(self, f"block{stage + 1}"):
            x = self._run_block(block, x, height, width)
        return x, height, width

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the maps of ``indices`` (as in :meth:`forward_intermediates`) do not
        need: later stages, and with ``prune_head`` (or when stages go) the class block and
        heads; ``prune_norm`` drops the final norm. Returns the stage indices taken."""
        take, last_taken = _stage_indices(self.num_stages, indices)
        drops_stages = last_taken + 1 < self.num_stages
        for stage in range(last_taken + 1, self.num_stages):
            for name in ("patch_embed", "block", "norm"):
                delattr(self, f"{name}{stage + 1}")
        self.num_stages = last_taken + 1
        self.depths, self.embed_dims = self.depths[:self.num_stages], self.embed_dims[:self.num_stages]
        if drops_stages:
            self.num_features = self.head_hidden_size = self.embed_dims[-1]
        if prune_head or drops_stages:
            self.post_network = nn.ModuleList()  # the class block reads the last stage's channels
            self.reset_classifier(0)
        if prune_norm and self.num_stages == len(self.feature_info):
            setattr(self, f"norm{self.num_stages}", nn.Identity())
        return take

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's loading hook (the cfg's ``custom_load``), for ``pretrained=True`` with
        ``pretrained_cfg_overlay=dict(file=path)``: an official release file or a checkpoint
        of ours, read and fitted by :func:`models.load_pretrained` (heads of another class
        count re-initialised); a checkpoint of ours also sets ``pretrained_cfg``'s
        preprocessing to the one it was trained with."""
        info = load_checkpoint_weights(self, checkpoint_path)
        cfg = checkpoint_cfg(info.metadata)
        if cfg:
            apply_pretrained_cfg(self, cfg)


def _stage_indices(num_stages: int, indices) -> tuple[list[int], int]:
    """``(stage indices, the largest)`` of timm's ``indices`` argument (see forward_intermediates)."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices}: the last n stages needs 1 <= n <= {num_stages}")
        chosen = list(range(num_stages - indices, num_stages))
    else:
        chosen = [index + num_stages if index < 0 else index for index in indices]
        if not chosen or not all(0 <= index < num_stages for index in chosen):
            raise ValueError(f"indices={list(indices)}: stage indices must lie in [{-num_stages}, {num_stages - 1}]")
    return chosen, max(chosen)


# --------------------------------------------------------------------------- checkpoints

def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict:
    """timm's ``pretrained_filter_fn``: an outside checkpoint made loadable into ``model``
    with ``load_state_dict(strict=True)``.

    Official release files (bare state dicts), training snapshots and checkpoints of
    this toolkit all go through :func:`models._helpers.filter_state_dict`: the weights
    unwrapped, ``module.``/``_orig_mod.`` stripped, heads of another class count
    replaced by the model's fresh ones, a ``dist_head`` the model lacks dropped.
    """
    return filter_state_dict(state_dict, model)[0]


# --------------------------------------------------------------------------- configs

OFFICIAL_CODE = "https://github.com/Amshaker/GroupMamba"
# The official Hugging Face repositories of the released ImageNet-1k weights, as the official
# README links them. Not an hf_hub_id: the file names inside are not known here, and a guessed
# name would fail only at download time; pretrained=True asks for the file instead.
OFFICIAL_WEIGHTS = {
    "groupmamba_tiny": "https://huggingface.co/Abdelrahman-shaker/GroupMamba-Tiny",
    "groupmamba_small": "https://huggingface.co/Abdelrahman-shaker/GroupMamba-Small",
    "groupmamba_base": "https://huggingface.co/Abdelrahman-shaker/GroupMamba-Base",
}


class PretrainedWeightsError(ValueError):
    """``pretrained=True`` without weights to load; the message says where to get them."""


def _cfg(weights: str, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.conv.0",
        "classifier": HEAD_NAMES,
        "origin_url": OFFICIAL_CODE,
        "paper_ids": "arXiv:2407.13772",
        "notes": (f"official weights: {weights}; load with pretrained_cfg_overlay=dict(file=path)",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg(weights) for name, weights in OFFICIAL_WEIGHTS.items()})


def _check_weight_source(variant: str, kwargs: dict) -> None:
    """PretrainedWeightsError unless ``pretrained=True`` has weights to load: there is no
    download location, so a file (or a state dict) must come with the call."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    if not (cfg.file or cfg.state_dict is not None or cfg.url or cfg.hf_hub_id):
        raise PretrainedWeightsError(
            f"{variant} has no download location: pass the official release file, "
            f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file='{variant}.pth')). "
            f"Get it from {OFFICIAL_WEIGHTS[variant]} or the Google Drive links in {OFFICIAL_CODE}")


def _create_groupmamba(variant: str, pretrained: bool = False, **kwargs) -> GroupMamba:
    if pretrained:
        _check_weight_source(variant, kwargs)
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if overlay.get("file"):  # read by GroupMamba.load_pretrained: release files and checkpoints of ours
            kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    # features_only: timm's FeatureGetterNet over forward_intermediates (a stage is not one module)
    return build_model_with_cfg(GroupMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


_RELEASED_NORM = partial(nn.LayerNorm, eps=1e-6)


# --------------------------------------------------------------------------- variants

@register_model
def groupmamba_tiny(pretrained: bool = False, **kwargs) -> GroupMamba:
    model_args = dict(stem_hidden_dim=32, embed_dims=[64, 128, 348, 448], mlp_ratios=[8, 8, 4, 4],
                      depths=[3, 4, 9, 3], norm_layer=_RELEASED_NORM)
    return _create_groupmamba("groupmamba_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def groupmamba_small(pretrained: bool = False, **kwargs) -> GroupMamba:
    model_args = dict(stem_hidden_dim=64, embed_dims=[64, 128, 348, 512], mlp_ratios=[8, 8, 4, 4],
                      depths=[3, 4, 16, 3], norm_layer=_RELEASED_NORM)
    return _create_groupmamba("groupmamba_small", pretrained, **dict(model_args, **kwargs))


@register_model
def groupmamba_base(pretrained: bool = False, **kwargs) -> GroupMamba:
    model_args = dict(stem_hidden_dim=64, embed_dims=[96, 192, 424, 512], mlp_ratios=[8, 8, 4, 4],
                      depths=[3, 6, 21, 3], norm_layer=_RELEASED_NORM)
    return _create_groupmamba("groupmamba_base", pretrained, **dict(model_args, **kwargs))
