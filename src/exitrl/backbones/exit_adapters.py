"""Exit adapters: small trainable modules that make a frozen causal LM's intermediate layers readable by its own
final norm and LM head.

A pretrained LM's middle layers barely agree with its last one (SmolLM2-135M's layer 8 picks the last layer's
greedy token 6 % of the time), because nothing ever asked them to. Retraining the trunk would change the model;
an adapter at exit E instead maps the state h_E to one the model's own head reads well: ``head(norm(adapt(h_E)))``.
The trunk is untouched, so the last layer's output stays bit-identical, and everything the adapters add is one
small file (`ExitAdapters.save`) that loads onto the same architecture from any source of weights (hub, GGUF
dequantised, an fp16 export): the file names the base model by its shape, not by a hash of its weights.

Kinds, cheapest first:

* ``linear``: an H × H map, initialised to the identity (at init the exit reads exactly as without it);
* ``mlp``: ``h + mlp(norm(h))`` with copies of the next layer's ``post_attention_layernorm`` and ``mlp``;
* ``layer``: copies of the ``depth`` decoder layers that follow the exit. They attend over earlier tokens, so they
  keep keys and values: in the same cache object as the model's layers, at extra indices after the model's own
  (`ExitAdapters.cache_layer_indices`).
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from exitrl.backbones.multi_exit import BackboneError
from exitrl.backbones.multi_exit_lm import GPT2_LIKE, MultiExitLM, call_llama_layer

ADAPTER_KINDS = ("linear", "mlp", "layer")
FORMAT = "exitrl-exit-adapters"
FORMAT_VERSION = 1
ARCHITECTURE_KEYS = ("model_type", "num_layers", "hidden_size", "vocab_size", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size")
_METADATA_KEY = "exitrl"


def base_architecture(model: MultiExitLM) -> dict:
    """What identifies the base model an adapter file fits: its shape, not its weights (the same model quantised
    and dequantised, or exported in fp16, is the same base)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    intermediate = getattr(config, "intermediate_size", None)
    if intermediate is None and model.layout == GPT2_LIKE:  # GPT-2 names it n_inner, None meaning 4 × hidden
        intermediate = getattr(config, "n_inner", None) or 4 * model.hidden_size
    return {"model_type": str(getattr(config, "model_type", "")), "num_layers": model.num_layers,
            "hidden_size": model.hidden_size, "vocab_size": model.vocab_size,
            "num_attention_heads": None if heads is None else int(heads),
            "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads or 0) or None,
            "intermediate_size": None if intermediate is None else int(intermediate)}


def check_exit_layers(exit_layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """The 1-indexed exits, sorted; a ValueError naming the bad values otherwise."""
    exits = list(exit_layers)
    if not exits:
        raise ValueError("exit_layers is empty: name at least one layer to adapt (1-indexed).")
    not_ints = [e for e in exits if isinstance(e, bool) or not isinstance(e, int)]
    if not_ints:
        raise ValueError(f"exit_layers must be whole layer numbers (1-indexed); got {not_ints}.")
    bad = sorted({e for e in exits if not 1 <= e <= num_layers - 1})
    if bad:
        raise ValueError(f"exit_layers {bad} are out of range: exit adapters go after layers 1..{num_layers - 1} of "
                         f"this {num_layers}-layer model (the last layer is the model's own output, never adapted).")
    if len(set(exits)) != len(exits):
        raise ValueError(f"exit_layers {exits} names a layer twice.")
    return tuple(sorted(exits))


class ResidualMLP(nn.Module):
    """``h + mlp(norm(h))``: the feed-forward half of a decoder layer, on its own."""

    def __init__(self, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm, self.mlp = norm, mlp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.norm(hidden))


class ExitAdapters(nn.Module):
    """One adapter per exit layer of a frozen `MultiExitLM`; attach with `MultiExitLM.attach_exit_adapters`."""

    def __init__(self, model: MultiExitLM, exit_layers: Iterable[int], kind: str = "linear", depth: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"Unknown exit adapter kind {kind!r}; valid: {', '.join(ADAPTER_KINDS)}.")
        if model.layout == GPT2_LIKE and kind != "linear":
            raise ValueError(f"Exit adapter kind {kind!r} copies Llama-like decoder layers; this model is laid out "
                             "like GPT-2, where only kind 'linear' is available.")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a whole number >= 1 (decoder layers per exit), got {depth!r}.")
        exits = check_exit_layers(exit_layers, model.num_layers)
        if kind == "layer":
            too_deep = [e for e in exits if e + depth > model.num_layers]
            if too_deep:
                raise ValueError(f"exit_layers {too_deep} with depth={depth} would copy layers past the model's "
                                 f"last ({model.num_layers}): an exit E copies layers E+1..E+depth (1-indexed).")
        self._exits, self._kind, self._depth = exits, kind, depth if kind == "layer" else 1
        self.architecture = base_architecture(model)
        self.trained_with: dict = {}  # the manifest's free-form ``training`` record, once loaded
        self._cache_keyword = model._cache_keyword
        self._cache_indices: dict[int, list[int]] = {}
        self._layer_types: dict[int, list[str]] = {}
        blocks = {}
        for position, exit_layer in enumerate(exits):
            blocks[str(exit_layer)] = self._build(model, exit_layer, position)
        self.blocks = nn.ModuleDict(blocks)
        self.to(dtype)
        self.requires_grad_(True)  # copies of a frozen trunk's modules arrive frozen

    def _build(self, model: MultiExitLM, exit_layer: int, position: int) -> nn.Module:
        if self._kind == "linear":
            linear = nn.Linear(model.hidden_size, model.hidden_size, bias=False,
                               device=model.lm_head.weight.device)
            nn.init.eye_(linear.weight)
            return linear
        following = model.layers[exit_layer]  # 0-based index E: the layer right after exit E
        if self._kind == "mlp":
            if not (hasattr(following, "post_attention_layernorm") and hasattr(following, "mlp")):
                raise ValueError(f"Exit adapter kind 'mlp' needs decoder layers with post_attention_layernorm and "
                                 f"mlp; {type(following).__name__} has other parts: use kind 'linear' or 'layer'.")
            return ResidualMLP(copy.deepcopy(following.post_attention_layernorm), copy.deepcopy(following.mlp))
        copies, indices = [], []
        for j in range(self._depth):
            index = model.num_layers + position * self._depth + j
            layer = copy.deepcopy(model.layers[exit_layer + j])
            for module in layer.modules():  # attention writes to the cache at ``self.layer_idx``
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = index
            copies.append(layer)
            indices.append(index)
        self._cache_indices[exit_layer] = indices
        self._layer_types[exit_layer] = [model.layer_types[exit_layer + j] for j in range(self._depth)]
        return nn.ModuleList(copies)

    # -- what they are ----------------------------------------------------------------------------------------
    @property
    def exit_layers(self) -> tuple[int, ...]:
        """The 1-indexed exit layers adapted, ascending."""
        return self._exits

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def depth(self) -> int:
        """Decoder layers per exit (kind ``layer``; 1 otherwise)."""
        return self._depth

    @property
    def needs_cache(self) -> bool:
        """Whether the adapters attend over earlier tokens (and so keep keys and values in the cache)."""
        return self._kind == "layer"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def cache_layer_indices(self, exit_layer: int) -> list[int]:
        """The cache indices exit ``exit_layer``'s adapter layers write to (after the model's own layers); empty for
        kinds that do not attend."""
        self._block(exit_layer)
        return list(self._cache_indices.get(exit_layer, []))

    def check_fits(self, model: MultiExitLM) -> None:
        """A `BackboneError` naming the first shape where ``model`` differs from the model these were built for."""
        check_architecture(self.architecture, base_architecture(model), "these exit adapters")

    def _block(self, exit_layer: int) -> nn.Module:
        if exit_layer not in self._exits:
            raise ValueError(f"No exit adapter at layer {exit_layer}; these adapt layers {list(self._exits)}.")
        return self.blocks[str(exit_layer)]

    # -- the forward ------------------------------------------------------------------------------------------
    def adapt(self, exit_layer: int, hidden: torch.Tensor, layer_inputs: dict | None = None) -> torch.Tensor:
        """The adapted state of 1-indexed ``exit_layer`` for states ``hidden [..., H]`` (returned in ``hidden``'s
        dtype). Kind ``layer`` also needs ``layer_inputs``: what the model's layers ran with (`MultiExitLM.embed`
        or `MultiExitLM.layer_inputs`); with a cache in them, its layers append their keys and values there."""
        block = self._block(exit_layer)
        dtype = hidden.dtype
        state = hidden.to(self.dtype)
        if self._kind != "layer":
            return block(state).to(dtype)
        if layer_inputs is None:
            raise ValueError("Exit adapters of kind 'layer' attend over earlier tokens: pass layer_inputs (what "
                             "MultiExitLM.embed returns beside the states) to adapt / exit_logits.")
        inputs = _in_dtype(layer_inputs, state.dtype)
        for layer, index, layer_type in zip(block, self._cache_indices[exit_layer], self._layer_types[exit_layer]):
            if inputs["cache"] is not None:
                _make_room(inputs["cache"], index)
            state = call_llama_layer(layer, state, inputs["masks"][layer_type], inputs, self._cache_keyword)
        return state.to(dtype)

    # -- one file ---------------------------------------------------------------------------------------------
    def manifest(self, training: dict | None = None) -> dict:
        """What `save` writes beside the weights (JSON)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self._kind, "depth": self._depth,
                "exit_layers": list(self._exits), "base": dict(self.architecture),
                "parameters": sum(p.numel() for p in self.parameters()), "dtype": str(self.dtype).split(".")[-1],
                "training": dict(training if training is not None else self.trained_with)}

    def save(self, path: str | Path, training: dict | None = None) -> Path:
        """One file: the weights and the manifest (safetensors when the package is there, else ``torch.save``),
        written atomically. ``training``: free-form, JSON-able facts about how they were trained."""
        from exitrl.core.checkpoint import write_atomic

        manifest = json.dumps(self.manifest(training))
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        try:
            from safetensors.torch import save as safetensors_bytes
        except ImportError:
            buffer = io.BytesIO()
            torch.save({_METADATA_KEY: manifest, "weights": weights}, buffer)
            data = buffer.getvalue()
        else:
            data = safetensors_bytes(weights, metadata={_METADATA_KEY: manifest})
        return write_atomic(path, data)

    @classmethod
    def load(cls, path: str | Path, model: MultiExitLM) -> ExitAdapters:
        """The adapters in ``path``, built onto ``model`` (which must have the shape they were trained for)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No exit-adapter file at {path}.")
        manifest, weights = read_adapter_file(path)
        check_architecture(manifest["base"], base_architecture(model), str(path))
        adapters = cls(model, manifest["exit_layers"], manifest["kind"], manifest["depth"])
        try:
            adapters.load_state_dict(weights)
        except RuntimeError as err:
            raise BackboneError(f"{path}: its weights do not match its own manifest ({err}); the file is damaged, "
                                "save the adapters again.") from err
        adapters.trained_with = dict(manifest.get("training") or {})
        return adapters.eval()


def check_architecture(saved: dict, ours: dict, what: str) -> None:
    for key in ARCHITECTURE_KEYS:
        if saved.get(key) != ours.get(key):
            raise BackboneError(
                f"{what} were made for a base model with {key}={saved.get(key)!r}, but this model has "
                f"{key}={ours.get(key)!r}. Use them with the model they were trained for ({saved.get('model_type')}, "
                f"{saved.get('num_layers')} layers, hidden {saved.get('hidden_size')}), or train adapters for this "
                "one (benchmarks/exit_adapters.py).")


def read_adapter_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(manifest, weights)`` of a file `ExitAdapters.save` wrote; a `BackboneError` for any other file."""
    manifest_text, weights = None, None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            manifest_text = (file.metadata() or {}).get(_METADATA_KEY)
            weights = {name: file.get_tensor(name) for name in file.keys()}
    except Exception:  # not safetensors (or the package is missing): maybe torch.save
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise BackboneError(f"{path} is not an exit-adapter file: it is neither safetensors nor torch.save "
                                f"data ({type(err).__name__}). Pass a file written by ExitAdapters.save.") from err
        if isinstance(payload, dict):
            manifest_text, weights = payload.get(_METADATA_KEY), payload.get("weights")
    try:
        manifest = json.loads(manifest_text) if manifest_text is not None else None
    except (TypeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(weights, dict):
        raise BackboneError(f"{path} holds no exit-adapter manifest (format {FORMAT!r}): it was not written by "
                            "ExitAdapters.save. Pass a file written by ExitAdapters.save.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BackboneError(f"{path} has exit-adapter format version {version!r}; this exitrl reads versions up to "
                            f"{FORMAT_VERSION}: upgrade exitrl to load it.")
    missing = [key for key in ("kind", "depth", "exit_layers", "base") if key not in manifest]
    if missing:
        raise BackboneError(f"{path}: its manifest lacks {missing}; the file is damaged, save the adapters again.")
    return manifest, weights


def _in_dtype(layer_inputs: dict, dtype: torch.dtype) -> dict:
    """The layers' inputs with rotary embeddings and additive masks in the adapters' dtype (a half-precision trunk
    feeds float32 adapters; attention wants its mask in the dtype of its queries)."""
    rotary = layer_inputs.get("position_embeddings")
    masks = layer_inputs["masks"]
    floats = [m for m in masks.values() if isinstance(m, torch.Tensor) and m.is_floating_point()]
    if (rotary is None or rotary[0].dtype == dtype) and all(m.dtype == dtype for m in floats):
        return layer_inputs
    converted = dict(layer_inputs)
    if rotary is not None:
        converted["position_embeddings"] = tuple(part.to(dtype) for part in rotary)
    converted["masks"] = {name: m.to(dtype) if isinstance(m, torch.Tensor) and m.is_floating_point() else m
                          for name, m in masks.items()}
    return converted


def _make_room(cache, index: int) -> None:
    """A transformers ``DynamicCache`` built from the model's config has an entry per model layer only: give it
    full-attention entries up to ``index`` for the adapters' layers. Caches that take any index (`SlotCache`, a
    ``DynamicCache()`` without config) need nothing."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or len(layers) > index or getattr(cache, "layer_class_to_replicate", None):
        return
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise ValueError(f"{type(cache).__name__} has room for {len(layers)} layers; exit adapters of kind 'layer' "
                         f"write at index {index}: use a DynamicCache or exitrl's SlotCache.")
    while len(layers) <= index:
        layers.append(DynamicLayer())
