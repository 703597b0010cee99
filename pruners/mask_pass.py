"""The shared shape of every mask pass: choose masks, install masked layers, record the masks.

A subclass only says how masks are chosen (`choose_masks`) and what its settings are; replay
installs the recorded masks instead of choosing again, so it needs neither weights nor data.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.fx as fx

from vitsparse.compiler import GraphPass, PassRecord, PassResult, ViTStructure

from .mask_codec import layer_decisions
from .masked import install_mask


class MaskPass(GraphPass):
    """Base for unstructured mask passes; `masks` (from a record) replays instead of choosing."""

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.replay_masks = masks

    @abstractmethod
    def choose_masks(self, gm: fx.GraphModule, structure: ViTStructure) -> dict[str, torch.Tensor]:
        """Boolean keep-masks (True = keep) by qualified layer name."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The pass's settings as JSON-ready values, for the record."""

    def __call__(self, gm: fx.GraphModule, structure: ViTStructure) -> PassResult:
        masks = self.replay_masks if self.replay_masks is not None else self.choose_masks(gm, structure)
        for name, mask in masks.items():
            install_mask(gm, name, mask)
        record = PassRecord(self.name, params=self.params(), decisions=layer_decisions(gm, masks))
        return PassResult(gm, record)
