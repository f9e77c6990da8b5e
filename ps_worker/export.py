"""Export the trained model: a torch state_dict that loads into the original
nn.Module, plus the pruning masks, saved with safetensors (never pickle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.utils.prune
from safetensors.torch import load_file, save_file
from torch import nn

from ps_common import codec
from ps_worker.optimizer import DistributedOptimizer

MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"


@dataclass
class ExportedModel:
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]  # True = kept, by parameter name; pruned parameters only

    def sparsity(self) -> dict[str, float]:
        """Fraction of zeros of each pruned parameter, measured on the weights."""
        return {
            name: 1.0 - int(torch.count_nonzero(self.state_dict[name])) / mask.numel()
            for name, mask in self.masks.items()
        }

    def overall_sparsity(self) -> float:
        """Fraction of zeros over all pruned parameters together (0 without pruning)."""
        total = sum(m.numel() for m in self.masks.values())
        zeros = sum(self.state_dict[n].numel() - int(torch.count_nonzero(self.state_dict[n])) for n in self.masks)
        return zeros / total if total else 0.0

    def nbytes(self) -> int:
        """Size with pruned parameters stored as (int32 index, value) pairs where
        that is smaller, everything else dense."""
        size = 0
        for name, tensor in self.state_dict.items():
            dense = tensor.numel() * tensor.element_size()
            sparse = codec.sparse_bytes(int(torch.count_nonzero(tensor)), tensor.element_size())
            size += min(dense, sparse) if name in self.masks else dense
        return size

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict, str(directory / MODEL_FILE))
        save_file({k: m.to(torch.uint8) for k, m in self.masks.items()}, str(directory / MASKS_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> ExportedModel:
        directory = Path(directory)
        masks = {k: m.bool() for k, m in load_file(str(directory / MASKS_FILE)).items()}
        return cls(load_file(str(directory / MODEL_FILE)), masks)


def export_model(model: nn.Module, optimizer: DistributedOptimizer) -> ExportedModel:
    """The model after training (waits for every worker), with its masks."""
    optimizer.pull_final()
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    return ExportedModel(state, optimizer.masks())


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Register the masks with torch.nn.utils.prune, so its users can carry on."""
    for name, mask in masks.items():
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        mask = mask.to(getattr(module, attribute).device)
        torch.nn.utils.prune.custom_from_mask(module, attribute, mask)  # type: ignore[no-untyped-call]
