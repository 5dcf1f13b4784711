"""Generic unit bookkeeping: scoring, zeroing and removing units from a table of slices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

MODULES = ("attn", "mlp")


@dataclass(frozen=True)
class Slice:
    """Unit u of a layer owns the block [u*size, (u+1)*size) of parameter `param` along `dim`."""

    param: str
    dim: int
    size: int


def _owner(layer: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return layer.get_submodule(owner), attr


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices along a slice's dim covered by `units`."""
    return (units[:, None] * size + torch.arange(size)).flatten()


class Adapter:
    """Names the prunable units of one decoder layer; subclasses give `layers` and `slices`.

    The first attention slice must be the query rows (FLOP counts read the query width from it)."""

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config

    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def slices(self, module: str) -> list[Slice]:
        raise NotImplementedError

    def param(self, layer: nn.Module, name: str) -> nn.Parameter:
        owner, attr = _owner(layer, name)
        return getattr(owner, attr)

    def prunable_params(self, layer: nn.Module) -> list[nn.Parameter]:
        return [self.param(layer, s.param) for m in MODULES for s in self.slices(m)]

    def linear(self, layer: nn.Module, name: str) -> nn.Linear:
        """The Linear layer owning parameter `name` (e.g. "self_attn.q_proj.weight")."""
        owner, _ = _owner(layer, name)
        assert isinstance(owner, nn.Linear), f"{name} is not a Linear parameter"
        return owner

    def linears(self, layer: nn.Module) -> list[nn.Linear]:
        """The distinct Linear layers owning prunable slices, in slice order (their inputs are what
        activation-aware criteria measure)."""
        return list(dict.fromkeys(self.linear(layer, s.param) for m in MODULES for s in self.slices(m)))

    def output_slice(self, module: str) -> Slice:
        """The module's one slice along input columns: its units' share of the output projection."""
        (out,) = [s for s in self.slices(module) if s.dim == 1]
        return out

    def output_projection(self, layer: nn.Module, module: str) -> nn.Linear:
        """The Linear that maps the module's units back to the residual stream (o_proj, down_proj)."""
        return self.linear(layer, self.output_slice(module).param)

    def add_output_bias(self, layer: nn.Module) -> None:
        """Give each output projection a zero bias if it has none: where FLAP's bias compensation goes,
        and what a model rebuilt from a compensated config needs before its weights load."""
        for module in MODULES:
            proj = self.output_projection(layer, module)
            if proj.bias is None:
                w = proj.weight
                proj.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)

    def unit_count(self, layer: nn.Module, module: str) -> int:
        s = self.slices(module)[0]
        return self.param(layer, s.param).shape[s.dim] // s.size

    def unit_params(self, layer: nn.Module, module: str) -> int:
        """Parameters owned by one unit of `module` (the A and M of method §2)."""
        total = 0
        for s in self.slices(module):
            p = self.param(layer, s.param)
            total += s.size * (p.numel() // p.shape[s.dim])
        return total

    def unit_scores(
        self, layer: nn.Module, module: str, per_weight: Callable[[nn.Parameter], torch.Tensor]
    ) -> torch.Tensor:
        """L1 sum of per-weight scores over each unit's slices, in float32."""
        n = self.unit_count(layer, module)
        total = torch.zeros(n, dtype=torch.float32)
        for s in self.slices(module):
            scores = per_weight(self.param(layer, s.param)).float().cpu()
            total += scores.movedim(s.dim, 0).reshape(n, -1).sum(dim=1)
        return total

    def prune_layer(self, layer: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        """Keep only units `keep[module]` (sorted indices); shapes shrink in place."""
        for module, units in keep.items():
            for s in self.slices(module):
                owner, attr = _owner(layer, s.param)
                p = getattr(owner, attr)
                index = unit_rows(units.to(torch.long), s.size).to(p.device)
                new = nn.Parameter(p.detach().index_select(s.dim, index).clone(), p.requires_grad)
                setattr(owner, attr, new)
                if isinstance(owner, nn.Linear):
                    owner.out_features, owner.in_features = owner.weight.shape

    def zero_units(self, layer: nn.Module, drop: dict[str, torch.Tensor]) -> None:
        """Zero the weights of units `drop[module]`: the dense equivalent of removing them."""
        with torch.no_grad():
            for module, units in drop.items():
                for s in self.slices(module):
                    p = self.param(layer, s.param)
                    p.index_fill_(s.dim, unit_rows(units.to(torch.long), s.size).to(p.device), 0.0)

    def resize_layer(self, layer: nn.Module, counts: dict[str, int]) -> None:
        """Shrink a freshly built layer to `counts` units per module, before weights load."""
        current = {m: self.unit_count(layer, m) for m in MODULES}
        if current != counts:
            self.prune_layer(layer, {m: torch.arange(counts[m]) for m in MODULES})
