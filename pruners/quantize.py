"""Static INT8 as a pass: the block linears become fake-quantized layers that train and export as QDQ.

`QuantizePass(QuantConfig(observer="percentile"), calibration=images)` calibrates two activation ranges
per layer (UINT8): its input, and its output before the bias. The outputs of `symmetric_outputs` layers
(qkv, the attention MatMuls' inputs) get zero point 128: OpenVINO runs attention in INT8 only then, and
in f32 at 127. The rest are asymmetric. It quantizes each weight
symmetrically per output channel (INT8, zero point 0), so every pruned zero stays exactly zero. The
output is requantized because ONNX Runtime fuses a QDQ MatMul into its integer kernel
(QLinearMatMul) only when the product is quantized: without it, it dequantizes every weight on every
call, which is slower than FP32. The layers subclass the masked layers:
masks stay in force through quantization-aware fine-tuning, and `fold_for_export` turns them into
frozen layers that `torch.onnx.export` writes as QuantizeLinear/DequantizeLinear pairs (the QDQ
format ONNX Runtime runs); `compiler.quantized_onnx` rewrites that into DeepSparse's operator format.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from vitsparse.compiler import (
    GraphPass,
    PassError,
    PassRecord,
    PassResult,
    RecipeError,
    ViTStructure,
    register_pass,
    replace_module,
)

from .calibration import Calibration, make_calibration
from .masked import MaskedConv2d, MaskedLinear
from .quant_observers import NEEDS_HISTOGRAM, OBSERVERS, RangeStats, activation_qparams, symmetric_qparams
from .targets import DEFAULT_TARGETS, check_target_kinds, select_targets

WEIGHT_QMAX = 127  # symmetric: codes in [-127, 127]; ONNX's INT8 range (-128, 127) is what export declares


def weight_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel max|w| / 127; an all-zero channel gets 1 (its codes are 0 whatever the scale)."""
    amax = weight.detach().abs().flatten(1).amax(1).float()
    return torch.where(amax > 0, amax / WEIGHT_QMAX, torch.ones_like(amax))


def per_channel(values: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """`values` (one per channel) shaped to broadcast over `like` along `channel_dim`."""
    shape = [1] * like.ndim
    shape[channel_dim] = -1
    return values.view(shape)


class _QuantMixin:
    """Fake quantization of the layer input and its pre-bias product (per tensor, UINT8) and of the
    weight (per channel, INT8); rounding passes gradients straight through, so the layer trains."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    act_scale: torch.Tensor
    act_zero_point: torch.Tensor
    out_scale: torch.Tensor
    out_zero_point: torch.Tensor
    frozen: bool = False
    channel_dim: int

    def _init_quant(self, ranges: LayerRanges, symmetric_output: bool = False) -> None:
        device = self.weight.device
        output_qparams = symmetric_qparams if symmetric_output else activation_qparams
        for prefix, (low, high), qparams in (("act", ranges.input, activation_qparams),
                                             ("out", ranges.output, output_qparams)):
            scale, zero_point = qparams(low, high)
            self.register_buffer(f"{prefix}_scale", torch.tensor(scale, dtype=torch.float32, device=device))
            self.register_buffer(f"{prefix}_zero_point", torch.tensor(zero_point, dtype=torch.int32,
                                                                      device=device))

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()  # (a no-op Cast would land in the export)
        return torch.fake_quantize_per_tensor_affine(x, self.act_scale, self.act_zero_point, 0, 255)

    def requantized_output(self, y: torch.Tensor) -> torch.Tensor:
        """The product (before the bias) rounded to UINT8 and back, then the float bias added."""
        y = y if y.dtype == torch.float32 else y.float()  # autocast's bf16 product (CUDA fine-tunes)
        y = torch.fake_quantize_per_tensor_affine(y, self.out_scale, self.out_zero_point, 0, 255)
        return y if self.bias is None else y + per_channel(self.bias, y, self.channel_dim)

    def quantized_weight(self) -> torch.Tensor:
        weight = self.weight if self.frozen else self.masked_weight()
        scales = self.weight_scale if self.frozen else weight_scales(weight)
        zero_points = torch.zeros(scales.shape, dtype=torch.int32, device=scales.device)
        return torch.fake_quantize_per_channel_affine(weight, scales, zero_points, 0, -128, 127)

    def export_module(self) -> nn.Module:
        """A copy with the mask folded into the weight and the weight scales fixed, for ONNX export."""
        frozen = copy.deepcopy(self)
        with torch.no_grad():
            frozen.weight.copy_(self.masked_weight())
        frozen.register_buffer("weight_scale", weight_scales(frozen.weight))
        frozen.frozen = True
        return frozen

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, input scale={float(self.act_scale):.4g} "
                f"zero point={int(self.act_zero_point)}, output scale={float(self.out_scale):.4g} "
                f"zero point={int(self.out_zero_point)}")


class QuantLinear(_QuantMixin, MaskedLinear):
    """A (possibly masked) Linear computing with INT8-rounded weights on UINT8-rounded inputs."""

    channel_dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.requantized_output(nn.functional.linear(self.quantized_input(x), self.quantized_weight()))


class QuantConv2d(_QuantMixin, MaskedConv2d):
    """The Conv2d counterpart (a quantized patch embedding)."""

    channel_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = self._conv_forward(self.quantized_input(x), self.quantized_weight(), None)
        return self.requantized_output(product)


QUANT_TYPES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}
QUANT_LAYERS = (QuantLinear, QuantConv2d)


@dataclass(frozen=True)
class LayerRanges:
    """The calibrated ranges of one layer: its input, and its output before the bias."""

    input: tuple[float, float]
    output: tuple[float, float]

    def to_json(self) -> dict[str, list[float]]:
        return {"input": [float(v) for v in self.input], "output": [float(v) for v in self.output]}

    @classmethod
    def from_json(cls, data: dict) -> LayerRanges:
        (in_low, in_high), (out_low, out_high) = data["input"], data["output"]
        return cls((float(in_low), float(in_high)), (float(out_low), float(out_high)))


def quantize_layer(layer: nn.Module, ranges: LayerRanges, symmetric_output: bool = False) -> nn.Module:
    """The quantized layer sharing `layer`'s parameters and keeping its mask (all true if it had none);
    `symmetric_output` quantizes its output with zero point 128 (`symmetric_qparams`)."""
    base = next((t for t in QUANT_TYPES if isinstance(layer, t)), None)
    if base is None:
        raise PassError(f"cannot quantize a {type(layer).__name__}; INT8 supports Linear and Conv2d")
    new = QUANT_TYPES[base].from_dense(layer)
    mask = getattr(layer, "weight_mask", None)
    if mask is not None:
        new.weight_mask = mask
    new._init_quant(ranges, symmetric_output)
    return new


@dataclass(frozen=True)
class QuantConfig:
    """Which layers to quantize and how their activation ranges are chosen (`OBSERVERS`)."""

    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)  # add "patch_embed", "head" to widen
    observer: str = "minmax"
    percentile: float = 99.99  # the `percentile` observer's clip point, per tail
    bins: int = 2048  # histogram bins of the `percentile` and `mse` observers
    calibration_images: int = 256  # read no more than this many images
    # layer kinds whose output is quantized with zero point 128 (`symmetric_qparams`); () for none
    symmetric_outputs: tuple[str, ...] = ("qkv",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", check_target_kinds(self.targets))
        symmetric = tuple(self.symmetric_outputs)
        object.__setattr__(self, "symmetric_outputs", check_target_kinds(symmetric) if symmetric else ())
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer {self.observer!r}; choose from {sorted(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {self.percentile}")
        if self.bins < 16 or self.calibration_images < 1:
            raise ValueError(f"bins must be >= 16 and calibration_images >= 1, got {self.bins} and "
                             f"{self.calibration_images}")


@register_pass
class QuantizePass(GraphPass):
    """Calibrate and fake-quantize the configured layers; replay installs the recorded ranges."""

    name = "int8"

    def __init__(self, config: QuantConfig | None = None, *, calibration: Any = None,
                 ranges: dict[str, LayerRanges] | None = None) -> None:
        self.config = config or QuantConfig()
        if ranges is None and calibration is None:
            raise ValueError("static INT8 needs calibration images for the activation ranges: pass "
                             "calibration=<images tensor, DataLoader or iterable of batches>")
        self.calibration = (None if ranges is not None
                            else make_calibration(calibration, self.config.calibration_images))
        self.replay_ranges = ranges

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        names = self._targets(gm, structure)
        ranges = self.replay_ranges if self.replay_ranges is not None else calibrate_ranges(
            gm, names, self.calibration, self.config)
        missing = sorted(set(names) - set(ranges))
        if missing:
            raise PassError(f"no recorded activation range for {missing}")
        kinds = self.config.symmetric_outputs
        symmetric = set(select_targets(structure, kinds)) if kinds else set()
        for name in names:
            replace_module(gm, name, quantize_layer(gm.get_submodule(name), ranges[name], name in symmetric))
        params = {**asdict(self.config), "targets": list(self.config.targets),
                  "symmetric_outputs": list(self.config.symmetric_outputs)}
        decisions = {"ranges": {name: ranges[name].to_json() for name in names}}
        record = PassRecord(self.name, params=params, decisions=decisions)
        if self.calibration is not None:
            record.stats["calibration_samples"] = self.calibration.num_samples
        return PassResult(gm, record)

    def _targets(self, gm: fx.GraphModule, structure: ViTStructure) -> list[str]:
        names = select_targets(structure, self.config.targets)
        if not names:
            raise PassError(f"no layer to quantize: this model has no {'/'.join(self.config.targets)} "
                            "layers")
        already = [n for n in names if isinstance(gm.get_submodule(n), QUANT_LAYERS)]
        if already:
            raise PassError(f"{already[0]} is already quantized ({len(already)} layers); apply the INT8 "
                            "pass once")
        return names

    @classmethod
    def from_record(cls, record: PassRecord) -> QuantizePass:
        try:
            # a record from before symmetric_outputs existed replays as it ran: every output asymmetric
            config = QuantConfig(**{**record.params, "targets": tuple(record.params.get("targets", ())),
                                    "symmetric_outputs": tuple(record.params.get("symmetric_outputs", ()))})
            ranges = {name: LayerRanges.from_json(data) for name, data in record.decisions["ranges"].items()}
        except (KeyError, TypeError, ValueError) as err:
            raise RecipeError(f"int8 record is malformed: {err}") from None
        return cls(config, ranges=ranges)


@torch.no_grad()
def calibrate_ranges(gm: fx.GraphModule, names: list[str], calibration: Calibration,
                     config: QuantConfig) -> dict[str, LayerRanges]:
    """Each layer's input and pre-bias output ranges: their span over the images, then, for a clipping
    observer, a histogram over that span."""
    stats = {name: (RangeStats(), RangeStats()) for name in names}
    passes = ["span", "histogram"] if config.observer in NEEDS_HISTOGRAM else ["span"]
    device = next(gm.parameters()).device
    was_training = gm.training
    gm.eval()
    try:
        for stage in passes:
            hooks = [gm.get_submodule(name).register_forward_hook(_observer_hook(*stats[name], stage, config))
                     for name in names]
            try:
                for images, _ in calibration:
                    gm(images.to(device))
            finally:
                for hook in hooks:
                    hook.remove()
    finally:
        gm.train(was_training)
    observer = OBSERVERS[config.observer]
    return {name: LayerRanges(observer(inputs, config.percentile), observer(outputs, config.percentile))
            for name, (inputs, outputs) in stats.items()}


def _observer_hook(inputs: RangeStats, outputs: RangeStats, stage: str, config: QuantConfig):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        product = output.detach()
        if module.bias is not None:
            product = product - per_channel(module.bias, product, 1 if isinstance(module, nn.Conv2d) else -1)
        for stats, values in ((inputs, args[0].detach()), (outputs, product)):
            if stage == "span":
                stats.observe_span(values)
            else:
                stats.observe_histogram(values, config.bins)
    return hook
