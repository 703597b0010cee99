"""Masked layers: Linear/Conv2d subclasses whose forward uses `weight * weight_mask`.

They subclass the dense layers so structure finding, tracing and cost counting treat them as
the layers they replace. The boolean mask is a buffer, so it travels in the state dict
(safetensors stores bool) and DDP broadcasts it from rank 0.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from vitsparse.compiler import PassError, replace_module


class _MaskMixin:
    """What every masked layer shares: the masked weight, zeroing in place, sparsity."""

    weight: nn.Parameter
    weight_mask: torch.Tensor

    def _init_mask(self) -> None:
        self.register_buffer("weight_mask", torch.ones(self.weight.shape, dtype=torch.bool,
                                                       device=self.weight.device))

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.weight_mask

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the masked weights in place (after an optimiser step, before export)."""
        self.weight.mul_(self.weight_mask)

    def sparsity(self) -> float:
        return 1.0 - int(self.weight_mask.sum()) / self.weight_mask.numel()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity():.4f}"

    def export_module(self) -> nn.Module:
        """The plain layer the compiler's export pass swaps in (see compiler.export.fold_for_export)."""
        return self.to_dense()


class MaskedLinear(_MaskMixin, nn.Linear):
    """nn.Linear computing with `weight * weight_mask` (bool buffer, same shape as the weight)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    @classmethod
    def from_dense(cls, dense: nn.Linear) -> MaskedLinear:
        """A masked layer sharing `dense`'s parameters, with an all-true mask."""
        new = cls(dense.in_features, dense.out_features, bias=dense.bias is not None, device="meta")
        return _adopt(new, dense)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the mask multiplied into its weight."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return _fold_into(dense, self)


class MaskedConv2d(_MaskMixin, nn.Conv2d):
    """nn.Conv2d computing with `weight * weight_mask` (for a masked patch embedding)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    @classmethod
    def from_dense(cls, dense: nn.Conv2d) -> MaskedConv2d:
        return _adopt(cls(**_conv_kwargs(dense)), dense)

    def to_dense(self) -> nn.Conv2d:
        return _fold_into(nn.Conv2d(**_conv_kwargs(self)), self)


def _conv_kwargs(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")


def _adopt(new: nn.Module, dense: nn.Module) -> nn.Module:
    new.weight, new.bias = dense.weight, dense.bias
    new.weight_mask = torch.ones(dense.weight.shape, dtype=torch.bool, device=dense.weight.device)
    new.train(dense.training)
    return new


def _fold_into(dense: nn.Module, masked: _MaskMixin) -> nn.Module:
    weight = masked.weight
    dense.weight = nn.Parameter(masked.masked_weight().detach().clone(), requires_grad=weight.requires_grad)
    dense.bias = masked.bias
    dense.train(masked.training)
    return dense


# dense type -> its masked version; later mask kinds (N:M, block) can reuse the same layers
MASKED_TYPES: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}
MASKED_LAYERS: tuple[type[nn.Module], ...] = (MaskedLinear, MaskedConv2d)


def masked_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every masked layer in `module`, by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, MASKED_LAYERS)}


def install_mask(gm: nn.Module, target: str, mask: torch.Tensor) -> nn.Module:
    """Make `target` a masked layer (if it is not one yet), AND `mask` into its mask, zero the weights.

    Masks only grow: a layer masked before keeps its pruned weights pruned.
    """
    try:
        module = gm.get_submodule(target)
    except AttributeError:
        raise PassError(f"graph has no module {target!r} to mask") from None
    if not isinstance(module, MASKED_LAYERS):
        masked_type = MASKED_TYPES.get(type(module))
        if masked_type is None:
            known = ", ".join(t.__name__ for t in MASKED_TYPES)
            raise PassError(f"cannot mask {target!r}: it is a {type(module).__name__}, masks support {known}")
        module = masked_type.from_dense(module)
        replace_module(gm, target, module)
    if tuple(mask.shape) != tuple(module.weight.shape):
        raise PassError(f"mask for {target!r} has shape {tuple(mask.shape)}, the weight has "
                        f"{tuple(module.weight.shape)}")
    module.weight_mask = module.weight_mask & mask.to(device=module.weight.device, dtype=torch.bool)
    module.apply_mask_()
    return module


def apply_masks_(module: nn.Module) -> int:
    """Call `apply_mask_()` on every submodule that has one; returns how many did."""
    count = 0
    for sub in module.modules():
        apply = getattr(sub, "apply_mask_", None)
        if callable(apply):
            apply()
            count += 1
    return count


def mask_sparsity(gm: nn.Module) -> dict[str, float]:
    """Fraction of masked-out weights per masked layer, by qualified name."""
    return {name: module.sparsity() for name, module in masked_modules(gm).items()}


def mask_digest(module: nn.Module) -> str:
    """sha256 over every mask (names, shapes, bits): equal digests mean identical masks."""
    digest = hashlib.sha256()
    for name, masked in sorted(masked_modules(module).items()):
        bits = masked.weight_mask.detach().to("cpu", torch.uint8).contiguous()
        digest.update(f"{name}{tuple(bits.shape)}".encode())
        digest.update(bits.numpy().tobytes())
    return digest.hexdigest()
