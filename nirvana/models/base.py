"""Generic unit bookkeeping: scoring, zeroing and removing units from a table of slices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from nirvana.core.errors import InputError
from nirvana.core.params import GRANULARITIES

ATTENTION, MLP = "attn", "mlp"
MODULES = (ATTENTION, MLP)
"""The modules of a decoder-only layer. Encoder-decoder layers may add "cross" (cross-attention),
which shares the attention pool: everything that is not MLP is attention."""

GRANULARITY_KEY = "nirvana_granularity"
"""Config attribute naming the attention unit: "group" (a whole KV group, the method's) or
"query_head" (one query head from every group, KV heads kept). Saved with a pruned model."""


def pool(module: str) -> str:
    """The allocation pool of a module: "mlp" or "attn" (self- and cross-attention alike)."""
    return MLP if module == MLP else ATTENTION


@dataclass(frozen=True)
class Slice:
    """Unit u of a layer owns blocks of `size` along `dim` of parameter `param`: viewing that dim as
    (groups, units, size), the blocks [g, u, :] for every g. groups=1 is one contiguous block."""

    param: str
    dim: int
    size: int
    groups: int = 1


def _owner(layer: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return layer.get_submodule(owner), attr


def unit_rows(units: torch.Tensor, size: int, groups: int = 1, count: int = 0) -> torch.Tensor:
    """Indices along a slice's dim covered by `units`, `count` the units per group (needed if groups > 1)."""
    rows = (units[:, None] * size + torch.arange(size)).flatten()
    return (torch.arange(groups)[:, None] * count * size + rows).flatten()


def slice_sums(per_weight: torch.Tensor, s: Slice, n: int) -> torch.Tensor:
    """Per-unit sums (float32, on the CPU) of a parameter's per-weight scores over slice `s` of n units."""
    return per_weight.float().movedim(s.dim, 0).reshape(s.groups, n, -1).sum(dim=(0, 2)).cpu()


def by_unit(values: torch.Tensor, s: Slice, n: int) -> torch.Tensor:
    """Values along slice `s`'s dim (one per row or column) regrouped as (n units, their values): unit u's
    blocks of every group in group order, the order `unit_rows` gives for u alone."""
    return values.reshape(s.groups, n, s.size).transpose(0, 1).reshape(n, -1)


class Adapter:
    """Names the prunable units of one layer; subclasses give `layers` and `slices`.

    The first attention slice must be the query rows (FLOP counts read the query width from it)."""

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config
        self.granularity = getattr(config, GRANULARITY_KEY, None) or "group"
        if self.granularity not in GRANULARITIES:
            raise InputError(f"attention.granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")

    def find_layers(self, model: nn.Module) -> list[nn.Module] | None:
        """The prunable layers in order if `model` holds them all (the full model or its backbone), else None."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> list[nn.Module]:
        found = self.find_layers(model)
        assert found is not None, f"{type(model).__name__} holds no prunable layers"
        return found

    def modules(self, layer: nn.Module) -> tuple[str, ...]:
        """The layer's modules with prunable units."""
        return MODULES

    def slices(self, layer: nn.Module, module: str) -> list[Slice]:
        """Where `module`'s units sit in `layer`'s parameters (every Adapter method takes layer, then module)."""
        raise NotImplementedError

    def before_prune(self, model: nn.Module) -> None:
        """Untie whatever the layers share and pruning would make inconsistent (T5's position bias)."""

    def after_resize(self, layer: nn.Module) -> None:
        """Update attributes that the layer's forward reads and that depend on its widths."""

    def param(self, layer: nn.Module, name: str) -> nn.Parameter:
        owner, attr = _owner(layer, name)
        return getattr(owner, attr)

    def all_slices(self, layer: nn.Module) -> list[Slice]:
        return [s for m in self.modules(layer) for s in self.slices(layer, m)]

    def prunable_params(self, layer: nn.Module) -> list[nn.Parameter]:
        return list(dict.fromkeys(self.param(layer, s.param) for s in self.all_slices(layer)))

    def linear(self, layer: nn.Module, name: str) -> nn.Linear:
        """The Linear layer owning parameter `name` (e.g. "self_attn.q_proj.weight")."""
        owner, _ = _owner(layer, name)
        assert isinstance(owner, nn.Linear), f"{name} is not a Linear parameter"
        return owner

    def linears(self, layer: nn.Module) -> list[nn.Linear]:
        """The distinct Linear layers owning prunable slices, in slice order (their inputs are what
        activation-aware criteria measure)."""
        return list(dict.fromkeys(self.linear(layer, s.param) for s in self.all_slices(layer)))

    def output_slice(self, layer: nn.Module, module: str) -> Slice:
        """The module's one slice along input columns: its units' share of the output projection."""
        (out,) = [s for s in self.slices(layer, module) if s.dim == 1]
        return out

    def output_columns(self, layer: nn.Module, module: str, values: torch.Tensor) -> torch.Tensor:
        """Per-column values of the output projection's input regrouped per unit, (units, columns of a unit):
        a query-head unit's columns are strided across KV groups, a KV group's are contiguous."""
        return by_unit(values, self.output_slice(layer, module), self.unit_count(layer, module))

    def output_projection(self, layer: nn.Module, module: str) -> nn.Linear:
        """The Linear that maps the module's units back to the residual stream (o_proj, down_proj)."""
        return self.linear(layer, self.output_slice(layer, module).param)

    def add_output_bias(self, layer: nn.Module) -> None:
        """Give each output projection a zero bias if it has none: where FLAP's bias compensation goes,
        and what a model rebuilt from a compensated config needs before its weights load."""
        for module in self.modules(layer):
            proj = self.output_projection(layer, module)
            if proj.bias is None:
                w = proj.weight
                proj.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), w.requires_grad)

    def unit_count(self, layer: nn.Module, module: str) -> int:
        s = self.slices(layer, module)[0]
        return self.param(layer, s.param).shape[s.dim] // (s.size * s.groups)

    def query_width(self, layer: nn.Module, module: str) -> int:
        """Query rows of an attention module (query heads x head_dim), for attention FLOP counts."""
        s = self.slices(layer, module)[0]
        return self.param(layer, s.param).shape[s.dim]

    def unit_params(self, layer: nn.Module, module: str) -> int:
        """Parameters owned by one unit of `module` (the A and M of method §2)."""
        total = 0
        for s in self.slices(layer, module):
            p = self.param(layer, s.param)
            total += s.size * s.groups * (p.numel() // p.shape[s.dim])
        return total

    def unit_scores(
        self, layer: nn.Module, module: str, per_weight: Callable[[nn.Parameter], torch.Tensor]
    ) -> torch.Tensor:
        """L1 sum of per-weight scores over each unit's slices, in float32."""
        n = self.unit_count(layer, module)
        total = torch.zeros(n, dtype=torch.float32)
        for s in self.slices(layer, module):
            total += slice_sums(per_weight(self.param(layer, s.param)), s, n)
        return total

    def _rows(self, layer: nn.Module, s: Slice, units: torch.Tensor, device: torch.device) -> torch.Tensor:
        count = self.param(layer, s.param).shape[s.dim] // (s.size * s.groups)
        return unit_rows(units.to(torch.long), s.size, s.groups, count).to(device)

    def prune_layer(self, layer: nn.Module, keep: dict[str, torch.Tensor]) -> None:
        """Keep only units `keep[module]` (sorted indices); shapes shrink in place."""
        for module, units in keep.items():
            for s in self.slices(layer, module):
                owner, attr = _owner(layer, s.param)
                p = getattr(owner, attr)
                index = self._rows(layer, s, units, p.device)
                new = nn.Parameter(p.detach().index_select(s.dim, index).clone(), p.requires_grad)
                setattr(owner, attr, new)
                if isinstance(owner, nn.Linear):
                    owner.out_features, owner.in_features = owner.weight.shape
        self.after_resize(layer)

    def zero_units(self, layer: nn.Module, drop: dict[str, torch.Tensor]) -> None:
        """Zero the weights of units `drop[module]`: the dense equivalent of removing them."""
        with torch.no_grad():
            for module, units in drop.items():
                for s in self.slices(layer, module):
                    p = self.param(layer, s.param)
                    p.index_fill_(s.dim, self._rows(layer, s, units, p.device), 0.0)

    def resize_layer(self, layer: nn.Module, counts: dict[str, int]) -> None:
        """Shrink a freshly built layer to `counts` units per module, before weights load."""
        current = {m: self.unit_count(layer, m) for m in self.modules(layer)}
        if current != counts:
            self.prune_layer(layer, {m: torch.arange(counts[m]) for m in self.modules(layer)})
