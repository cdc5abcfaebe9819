"""Low-rank trunk deltas: the "light trunk tuning" arm of exit-ready LMs, kept as one small file.

Exit adapters (`exitrl.backbones.exit_adapters`) leave the trunk untouched. The other arm lets the trunk move a
little so its middle layers become readable, with the original last layer as an anchor
(`exitrl.backbones.trunk_tuning`). Tuning every weight would make "what the exits add" the whole model; a rank-r
delta ΔW = (α / r) · B A on every linear map of every decoder layer keeps it small (SmolLM2-135M at r = 8: about
2.4 M numbers, 9.3 MiB in float32) and loads onto the same architecture from any source of weights.

* ``TrunkLoRA(model, rank)`` wraps each decoder layer's `nn.Linear` modules in place (`LoRALinear`); B starts at
  zero, so the wrapped model computes exactly what it did. ``enabled(False)`` turns every delta off (the frozen
  original, for the anchor's teacher) without touching any weight.
* ``merge()`` folds the deltas into the base weights and puts the plain `nn.Linear` modules back, so the decoding
  engine, its fused key/value fill and ``torch.compile`` see an ordinary model; ``unmerge()`` restores the exact
  original weights (kept aside, not subtracted back).
* ``save`` / ``load``: one safetensors file with a manifest naming the base model by its shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from exitrl.backbones.exit_adapters import base_architecture, check_architecture
from exitrl.backbones.multi_exit import BackboneError
from exitrl.backbones.multi_exit_lm import MultiExitLM

FORMAT = "exitrl-trunk-lora"
FORMAT_VERSION = 1
_METADATA_KEY = "exitrl"


class LoRALinear(nn.Module):
    """``base(x) + (α / r) · x Aᵀ Bᵀ`` with the base frozen; B starts at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = float(alpha) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.active:
            return out
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return out + (self.scale * delta).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """ΔW ``[out, in]`` in float32."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())


def _check_rank(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a whole number >= 1, got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}.")


class TrunkLoRA(nn.Module):
    """Rank-``rank`` deltas on every `nn.Linear` of every decoder layer of ``model`` (wrapped in place)."""

    def __init__(self, model: MultiExitLM, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        _check_rank(rank, alpha)
        self.rank, self.alpha = rank, float(alpha)
        self.architecture = base_architecture(model)
        self.model = [model]  # not a submodule: the trunk's weights are not the deltas' state
        self.wrapped = nn.ModuleDict()
        for index, layer in enumerate(model.layers):
            for name, module in list(layer.named_modules()):
                if isinstance(module, nn.Linear):
                    wrapper = LoRALinear(module, rank, alpha)
                    _set_module(layer, name, wrapper)
                    self.wrapped[_key(index, name)] = wrapper
        if not self.wrapped:
            raise BackboneError("TrunkLoRA found no nn.Linear in the model's decoder layers (a GPT-2 Conv1D model "
                                "is not supported): use a Llama-like model.")
        self._originals: dict[str, torch.Tensor] | None = None

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [p for w in self.wrapped.values() for p in (w.lora_a, w.lora_b)]

    def enabled(self, on: bool) -> TrunkLoRA:
        for wrapper in self.wrapped.values():
            wrapper.active = on
        return self

    @torch.no_grad()
    def merge(self) -> TrunkLoRA:
        """Fold every delta into its base weight and put the plain `nn.Linear` back (originals kept aside)."""
        if self._originals is not None:
            return self
        model = self.model[0]
        self._originals = {}
        for key, wrapper in self.wrapped.items():
            index, name = _split(key)
            self._originals[key] = wrapper.base.weight.detach().clone()
            wrapper.base.weight.add_(wrapper.delta().to(wrapper.base.weight.dtype))
            _set_module(model.layers[index], name, wrapper.base)
        return self

    @torch.no_grad()
    def unmerge(self) -> TrunkLoRA:
        """The exact original weights back, and the wrappers in place again."""
        if self._originals is None:
            return self
        model = self.model[0]
        for key, wrapper in self.wrapped.items():
            index, name = _split(key)
            wrapper.base.weight.copy_(self._originals[key])
            _set_module(model.layers[index], name, wrapper)
        self._originals = None
        return self

    def remove(self) -> None:
        """Unmerge and unwrap: the model exactly as it was before the deltas."""
        self.unmerge()
        model = self.model[0]
        for key, wrapper in self.wrapped.items():
            index, name = _split(key)
            _set_module(model.layers[index], name, wrapper.base)

    # -- one file -------------------------------------------------------------------------------------------
    def save(self, path: str | Path, training: dict | None = None) -> Path:
        from safetensors.torch import save as safetensors_bytes

        from exitrl.core.checkpoint import write_atomic

        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "rank": self.rank, "alpha": self.alpha,
                    "base": dict(self.architecture), "modules": list(self.wrapped.keys()),
                    "parameters": sum(p.numel() for p in self.parameters_to_train()), "training": training or {}}
        weights = {f"{key}.{part}": getattr(w, f"lora_{part}").detach().float().cpu().contiguous()
                   for key, w in self.wrapped.items() for part in ("a", "b")}
        return write_atomic(path, safetensors_bytes(weights, metadata={_METADATA_KEY: json.dumps(manifest)}))

    @classmethod
    def load(cls, path: str | Path, model: MultiExitLM) -> TrunkLoRA:
        """The deltas in ``path`` wrapped onto ``model`` (call `merge` to decode with them)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No trunk-delta file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as file:
                manifest = json.loads((file.metadata() or {}).get(_METADATA_KEY, "null"))
                weights = {name: file.get_tensor(name) for name in file.keys()}
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same actionable message
            raise BackboneError(f"{path} is not a trunk-delta file ({type(err).__name__}): pass a file written by "
                                "TrunkLoRA.save.") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BackboneError(f"{path} holds no trunk-delta manifest (format {FORMAT!r}): pass a file written by "
                                "TrunkLoRA.save.")
        check_architecture(manifest["base"], base_architecture(model), str(path))
        lora = cls(model, int(manifest["rank"]), float(manifest["alpha"]))
        with torch.no_grad():
            for key, wrapper in lora.wrapped.items():
                wrapper.lora_a.copy_(weights[f"{key}.a"])
                wrapper.lora_b.copy_(weights[f"{key}.b"])
        lora.trained_with = manifest.get("training") or {}
        return lora


def _key(index: int, name: str) -> str:
    return f"layer{index}-{name.replace('.', '-')}"


def _split(key: str) -> tuple[int, str]:
    layer, name = key.split("-", 1)
    return int(layer.removeprefix("layer")), name.replace("-", ".")


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
