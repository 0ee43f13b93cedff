"""Many LoRA adapters in one batch: each batch row adds the update of its own adapter's slot.

    router, layers = install_multi_lora(model, slots=16, rank=16)   # wraps the decoder's linear layers
    layers[name].load_slot(slot, a, b)                              # an adapter's weights, from read_adapter
    router.set(row_slots, device)                                   # before a forward pass: each row's slot
    router.clear()                                                  # after it: the plain base model again

`read_adapter` turns a peft folder into the (A, B·scale) pairs a slot holds; `merged_layer` folds one
slot into a copy of its layer, for batches that use that adapter alone.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from bot.model import ModelError
from bot.serving.interface import AdapterError


class LoraRouter:
    """Which adapter slot each row of the running batch uses; read by every MultiLoraLinear."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None
        self._versions = itertools.count(1)

    def set(self, row_slots: list[int], device: torch.device, merged: frozenset[int] = frozenset(),
            rank: int | None = None) -> None:
        """`row_slots[i]` is the slot of batch row i, or -1 for the base model; `merged` are the slots
        whose weights are folded into a copy of the layers (used when a batch needs that slot alone);
        `rank` is the highest rank among the slots (the banks' columns beyond it are zero and not read)."""
        active = {s for s in row_slots if s >= 0}
        if not active:
            self.plan = None
        elif len(active) == 1 and -1 not in row_slots:  # every row on one adapter
            slot = active.pop()
            self.plan = BatchPlan(next(self._versions), slot=slot, merged=slot if slot in merged else None, rank=rank)
        else:
            # A request's candidates are consecutive rows on one slot. Rows are split into groups of
            # the largest size that divides every run of equal slots, so each group reads its
            # adapter's weights once (per row, a request of 3 candidates would read them 3 times).
            size = math.gcd(*(len(list(run)) for _, run in itertools.groupby(row_slots)))
            # -1 indexes each bank's last slot, which stays zero: the base model
            self.plan = BatchPlan(next(self._versions), groups=torch.tensor(row_slots[::size], device=device),
                                  rank=rank)

    def clear(self) -> None:
        self.plan = None


@dataclass
class BatchPlan:
    version: int
    slot: int | None = None             # every row uses this slot ...
    merged: int | None = None           # ... whose merged layers are ready
    groups: torch.Tensor | None = None  # or: the slot of each group of consecutive rows (-1: the base model)
    rank: int | None = None             # bank columns read (None: all)


class MultiLoraLinear(nn.Module):
    """A linear layer plus a bank of LoRA slots; each batch row adds the update of its own slot.

    For a mixed batch, each row group's A and B are gathered once per batch into [groups, in, r] and
    [groups, r, out] (r: the highest rank among the batch's adapters, not the bank's), so a step costs
    two batched matmuls (added in place to the base output) whatever the mix of users, instead of a
    loop over adapters. A batch that needs one adapter alone runs on a merged copy of the layer when
    one is ready (`merged`, built by `merge_slot`): then the adapter costs nothing per token.
    """

    def __init__(self, base: nn.Module, slots: int, rank: int, router: LoraRouter):
        super().__init__()
        self.base = base
        self.router = router
        # a dynamic int8 layer has a packed weight; its inputs and outputs stay float32 on the CPU. On
        # the CPU the banks are float32 whatever the weights: small bfloat16 batched matmuls are slower there.
        dtype, device = (base.weight.dtype, base.weight.device) if isinstance(base, nn.Linear) else \
            (torch.float32, torch.device("cpu"))
        if device.type == "cpu":
            dtype = torch.float32
        # one slot more than can be loaded: the last one stays zero and serves rows on the base model
        self.register_buffer("lora_a", torch.zeros(slots + 1, base.in_features, rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots + 1, rank, base.out_features, dtype=dtype, device=device),
                             persistent=False)
        self._version = 0
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None
        self.merged: dict[int, nn.Module] = {}  # slot -> this layer with that slot's update folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.router.plan
        if plan is None:
            return self.base(x)
        if plan.merged is not None:
            return self.merged[plan.merged](x)
        y = self.base(x)  # a new tensor: the update is added to it in place (cast to its dtype)
        x, rank = x.to(self.lora_a.dtype), plan.rank
        if plan.groups is None:
            return y.add_((x @ self.lora_a[plan.slot, :, :rank]) @ self.lora_b[plan.slot, :rank])
        if self._version != plan.version:  # a mixed batch reads only the ranks its adapters use
            self._a, self._b = self.lora_a[:, :, :rank][plan.groups], self.lora_b[:, :rank][plan.groups]
            self._version = plan.version
        x = x.reshape(len(plan.groups), -1, x.shape[-1])
        if y.dtype == self._b.dtype:  # float32 outputs (int8 layers): the update is added by the matmul itself
            y.view(len(plan.groups), -1, y.shape[-1]).baddbmm_(torch.bmm(x, self._a), self._b)
            return y
        return y.add_(torch.bmm(torch.bmm(x, self._a), self._b).view(y.shape))

    @torch.no_grad()
    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write an adapter's A [in, r] and B·scale [r, out] into `slot` (None: the adapter leaves this
        layer alone); the rest of the slot is zero and its merged copy, if any, is dropped."""
        self.clear_slot(slot)
        if a is not None:
            r = a.shape[1]
            self.lora_a[slot, :, :r].copy_(a)
            self.lora_b[slot, :r, :].copy_(b)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero `slot` (a freed slot keeps no user's weights) and drop its merged copy."""
        self.merged.pop(slot, None)
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self._version = 0  # batches planned before this change must gather their rows again

    @torch.no_grad()
    def merge_slot(self, slot: int) -> None:
        """Build the copy of this layer with `slot`'s update folded in (see `merged_layer`)."""
        self.merged[slot] = merged_layer(self.base, self.lora_a[slot], self.lora_b[slot])

    def unmerge_slot(self, slot: int) -> None:
        """Drop `slot`'s merged copy, if any."""
        self.merged.pop(slot, None)


def merged_layer(base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """A copy of `base` with the LoRA update x·A·B folded into its weight (dynamic int8 layers are
    quantised again the way `quantize_dynamic` does it: symmetric, per tensor or per channel)."""
    delta = (a.float() @ b.float()).T  # [out, in]
    if isinstance(base, nn.Linear):
        merged = torch.nn.utils.skip_init(nn.Linear, base.in_features, base.out_features, bias=base.bias is not None,
                                          device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged
    old = base.weight()
    weight = old.dequantize() + delta
    if old.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine):
        scales = (weight.abs().amax(dim=1) / 127.5).clamp(min=1e-8).double()
        qweight = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
    else:
        qweight = torch.quantize_per_tensor(weight, max(weight.abs().max().item() / 127.5, 1e-8), 0, torch.qint8)
    merged = torch.ao.nn.quantized.dynamic.Linear(base.in_features, base.out_features, dtype=torch.qint8)
    merged.set_weight_bias(qweight, base.bias())
    return merged


def install_multi_lora(model: nn.Module, slots: int, rank: int) -> tuple[LoraRouter, dict[str, MultiLoraLinear]]:
    """Wrap every linear layer of the decoder blocks (not the LM head) with a slot bank, in place."""
    router = LoraRouter()
    layers: dict[str, MultiLoraLinear] = {}
    linear = (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    for name, module in list(model.named_modules()):
        if isinstance(module, linear) and ".layers." in name:
            parent_name, _, attr = name.rpartition(".")
            wrapped = MultiLoraLinear(module, slots, rank, router)
            setattr(model.get_submodule(parent_name), attr, wrapped)
            layers[name] = wrapped
    if not layers:
        raise ModelError("found no decoder linear layers to serve LoRA adapters on")
    return router, layers


def read_adapter(path: Path, max_rank: int, modules: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft LoRA folder as {module: (A [in, r], B·scale [r, out])}, checked against what can be served."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise AdapterError(f"adapter folder {path} is missing adapter_config.json or adapter_model.safetensors")
    try:
        config = json.loads(config_file.read_text())
        tensors = load_file(str(weights_file))
    except Exception as exc:
        raise AdapterError(f"adapter folder {path} cannot be read: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise AdapterError(f"{path}: only plain LoRA adapters can be served together (no DoRA)")
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    if rank > max_rank:
        raise AdapterError(f"{path}: rank {rank} is above serving.max_rank {max_rank}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
    weights = {}
    for module, pair in pairs.items():
        if module not in modules:
            raise AdapterError(f"{path}: adapts {module}, which this model cannot serve adapters on")
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: {module} lacks half of its LoRA pair")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{path}: {module} holds non-finite weights")
        weights[module] = (a.T.contiguous(), (b.T * scale).contiguous())
    if not weights:
        raise AdapterError(f"{path}: no LoRA weights found")
    return weights
