"""`MultiExitLM`: any Hugging Face causal LM, runnable layer by layer, with an exit after every layer.

The same three-step seam as `MultiExitModel` (`exitrl.backbones.protocol`): ``embed`` a batch, ``run_layer`` i on a
state, ``exit_logits`` at layer i. No modeling code is copied: the wrapper calls the model's own token embedding,
position embedding or rotary module, its own decoder layers one at a time, the causal (and sliding-window) masks
built by transformers' own mask utilities, and a transformers KV cache object, which the layers fill as they do in
the model's own forward. Two families of layout are driven:

* Llama-like (Llama, Qwen2, Qwen3, Mistral, and others shaped ``model.{embed_tokens, layers, norm, rotary_emb}``);
* GPT-2-like (``transformer.{wte, wpe, h, ln_f}``).

Exits (LayerSkip's choice is the default): ``shared`` reads every layer through the model's own final norm and LM
head, so the last exit *is* the model; ``per_layer`` gives each layer a small adapter of its own (a hidden × hidden
linear map, initialised to the identity) before that same norm and head: a head per layer without a vocabulary-
sized matrix per layer (30 of them would be 850M parameters for SmolLM2).

A construction-time self-check proves that the layer-by-layer path equals the model's own forward (logits and the
KV cache, on a padded batch and one cached decoding step), so an architecture it cannot drive is refused with a
clear error instead of giving wrong numbers.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

if TYPE_CHECKING:  # loading transformers' modeling code costs seconds; annotations do not need it
    from transformers import DynamicCache, PreTrainedModel

from exitrl.backbones.multi_exit import BackboneError, skip_rows

EXITS = ("shared", "per_layer")
LLAMA_LIKE, GPT2_LIKE = "llama-like", "gpt2-like"


def _cache_keyword() -> str:
    """The name transformers gives the KV cache argument of masks and layers (``past_key_values`` before 5.2x,
    ``cache`` since)."""
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def call_llama_layer(layer: nn.Module, hidden: torch.Tensor, mask, layer_inputs: dict,
                     cache_keyword: str) -> torch.Tensor:
    """A Llama-like decoder layer called as the model's own forward calls its layers: the model's layers, and copies
    of them that follow an exit (`exitrl.backbones.exit_adapters`), go through this one call."""
    cache = layer_inputs["cache"]
    out = layer(hidden, attention_mask=mask, position_ids=layer_inputs["position_ids"],
                position_embeddings=layer_inputs.get("position_embeddings"), use_cache=cache is not None,
                **{cache_keyword: cache})
    return out[0] if isinstance(out, tuple) else out


def layout_of(lm: PreTrainedModel) -> str:
    """Which layout ``lm`` has, or a `BackboneError` that says which models exitrl drives."""
    body = getattr(lm, "model", None)
    if body is not None and all(hasattr(body, part) for part in ("embed_tokens", "layers", "norm")):
        return LLAMA_LIKE
    body = getattr(lm, "transformer", None)
    if body is not None and all(hasattr(body, part) for part in ("wte", "wpe", "h", "ln_f")):
        return GPT2_LIKE
    raise BackboneError(
        f"exitrl cannot drive {type(lm).__name__} layer by layer: it drives causal LMs laid out like Llama, Qwen2/3 "
        "and Mistral (model.embed_tokens, model.layers, model.norm) or like GPT-2 (transformer.wte, wpe, h, ln_f).")


class MultiExitLM(nn.Module):
    """A causal LM with an exit (logits over the vocabulary) after every layer."""

    is_lm = True  # recipes train it with their ``lm_loss``

    def __init__(self, lm: PreTrainedModel, exits: str = "shared"):
        super().__init__()
        if exits not in EXITS:
            raise BackboneError(f"Unknown exits {exits!r}; valid: {', '.join(EXITS)}.")
        self.lm = lm
        self.weights_source = getattr(lm.config, "_name_or_path", "") or "a model built in memory"  # loading refines it
        self.layout = layout_of(lm)
        self.config = lm.config
        body = lm.model if self.layout == LLAMA_LIKE else lm.transformer
        self.body = body
        self.layers = body.layers if self.layout == LLAMA_LIKE else body.h
        self.final_norm = body.norm if self.layout == LLAMA_LIKE else body.ln_f
        self.lm_head = lm.get_output_embeddings()
        self.num_layers = len(self.layers)
        self.hidden_size = int(lm.config.hidden_size)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.exits = exits
        self.adapters = None
        if exits == "per_layer":
            self.adapters = nn.ModuleList(nn.Linear(self.hidden_size, self.hidden_size, bias=False)
                                          for _ in range(self.num_layers))
            for adapter in self.adapters:
                nn.init.eye_(adapter.weight)
        types = getattr(lm.config, "layer_types", None)
        if types is None and getattr(lm.config, "sliding_window", None) and lm.config.model_type == "mistral":
            types = ["sliding_attention"] * self.num_layers  # Mistral slides every layer when a window is set
        self.layer_types = list(types or ["full_attention"] * self.num_layers)[: self.num_layers]
        self._cache_keyword = _cache_keyword()
        self.exit_adapters = None  # `attach_exit_adapters`
        self.train(lm.training)  # the wrapper starts in the mode of the model it wraps

    # -- the pieces a walk calls one by one -------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        """An empty KV cache the layers fill (transformers' own class)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              cache: DynamicCache | None = None, position_ids: torch.Tensor | None = None,
              cache_layer: int = 0) -> tuple[torch.Tensor, dict]:
        """Token (and position) embeddings of ``input_ids [B, T]`` and what every layer takes besides the state:
        the masks per attention type, positions, rotary embeddings and the cache (``cache`` holds the earlier
        tokens' keys and values; the layers append this step's). ``cache_layer``: the first layer these inputs
        will run through, whose cache length the masks are sized by (self-speculative verification feeds the
        deep layers positions the shallow ones already hold)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        if position_ids is None:
            past = cache.get_seq_length(cache_layer) if cache is not None else 0
            position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) + past).unsqueeze(0)
        hidden = self.embed_tokens(input_ids, position_ids)
        mask_arguments = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                          self._cache_keyword: cache, "position_ids": position_ids}
        if cache_layer:
            mask_arguments["layer_idx"] = cache_layer
        masks = {"full_attention": create_causal_mask(**mask_arguments)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_arguments)
        return hidden, self.layer_inputs(hidden, position_ids, masks, cache)

    def embed_tokens(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The model's own token embedding (and, GPT-2-like, position embedding) of ``input_ids [B, T]``."""
        if self.layout == LLAMA_LIKE:
            return self.body.embed_tokens(input_ids)
        return self.body.drop(self.body.wte(input_ids) + self.body.wpe(position_ids))

    def layer_inputs(self, hidden: torch.Tensor, position_ids: torch.Tensor, masks: dict, cache) -> dict:
        """What every layer takes besides the state, from masks built by the caller (one per attention type:
        additive or boolean ``[B, 1, T, keys]``); ``hidden`` only lends its dtype and device to the rotary
        embedding. A decoding engine with its own static cache builds its masks itself (`exitrl.decoding`)."""
        layer_inputs = {"masks": masks, "position_ids": position_ids, "cache": cache}
        rotary = getattr(self.body, "rotary_emb", None)
        if rotary is not None:
            layer_inputs["position_embeddings"] = rotary(hidden, position_ids)
        return layer_inputs

    def run_layer(self, index: int, hidden: torch.Tensor, layer_inputs: dict) -> torch.Tensor:
        """Layer ``index`` (0-based) of the model's own layers; it appends its keys and values to the cache."""
        layer, cache = self.layers[index], layer_inputs["cache"]
        mask = layer_inputs["masks"][self.layer_types[index]]
        if self.layout == LLAMA_LIKE:
            return call_llama_layer(layer, hidden, mask, layer_inputs, self._cache_keyword)
        out = layer(hidden, cache, mask, use_cache=cache is not None, position_ids=layer_inputs["position_ids"])
        return out[0] if isinstance(out, tuple) else out

    def write_keys_values(self, index: int, hidden: torch.Tensor, layer_inputs: dict) -> None:
        """Append only the keys and values layer ``index`` would append for the states ``hidden`` (CALM's state
        propagation: a skipped layer's cache entries computed from the exited state), with the layer's own norm,
        projections and rotary embedding and none of its attention or MLP. `keys_values_exact` says whether this
        equals what the whole layer writes for this architecture; where it does not, run the layer instead."""
        layer, cache = self.layers[index], layer_inputs["cache"]
        if self.layout == GPT2_LIKE:
            attention = layer.attn
            _, key, value = attention.c_attn(layer.ln_1(hidden)).split(attention.split_size, dim=2)
            shape = (*key.shape[:-1], -1, attention.head_dim)
            key, value = key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)
        else:
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            shape = (*normed.shape[:-1], -1, attention.head_dim)
            key = attention.k_proj(normed).view(shape)
            if getattr(attention, "k_norm", None) is not None:  # Qwen3 normalises keys per head
                key = attention.k_norm(key)
            key, value = key.transpose(1, 2), attention.v_proj(normed).view(shape).transpose(1, 2)
            cos, sin = (part.unsqueeze(1) for part in layer_inputs["position_embeddings"])
            half = key.shape[-1] // 2
            key = key * cos + torch.cat((-key[..., half:], key[..., :half]), -1) * sin  # rotary, as the layer does
        cache.update(key, value, index)

    @property
    def keys_values_exact(self) -> bool:
        """Whether `write_keys_values` writes what every whole layer writes (checked once per weight dtype, on
        random states)."""
        checked = self.__dict__.setdefault("_keys_values_exact", {})
        dtype = self.lm_head.weight.dtype
        if dtype not in checked:
            checked[dtype] = self._check_keys_values()
        return checked[dtype]

    @torch.no_grad()
    def _check_keys_values(self) -> bool:
        device = self.lm_head.weight.device
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(self.vocab_size, (2, 3), generator=generator).to(device)
        states = torch.randn(2, 3, self.hidden_size, generator=generator).to(device, self.lm_head.weight.dtype)
        whole, alone = self.new_cache(), self.new_cache()
        try:
            for index in range(self.num_layers):
                _, inputs = self.embed(ids, None, whole, cache_layer=index)
                self.run_layer(index, states, inputs)
                _, inputs = self.embed(ids, None, alone, cache_layer=index)
                self.write_keys_values(index, states, inputs)
            tolerance = 1e-4 if states.dtype == torch.float32 else 2e-2  # half precision rounds differently
            return all(torch.allclose(a.keys, b.keys, atol=tolerance, rtol=tolerance)
                       and torch.allclose(a.values, b.values, atol=tolerance, rtol=tolerance)
                       for a, b in zip(whole.layers, alone.layers))
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
            return False

    def attach_exit_adapters(self, adapters) -> MultiExitLM:
        """Read the exits `adapters` (`exitrl.backbones.exit_adapters.ExitAdapters`, or None to drop them) were
        trained for through them. Attached, not registered: the model's parameters, ``state_dict`` and ``.to()``
        stay the trunk's own (the adapters travel in their own file and move with their own ``.to()``)."""
        if adapters is not None:
            adapters.check_fits(self)
        self.__dict__["exit_adapters"] = adapters
        return self

    def exit_states(self, index: int, hidden: torch.Tensor, layer_inputs: dict | None = None) -> torch.Tensor:
        """What the LM head reads at layer ``index`` (0-based) for states ``[..., H]``: through the attached exit
        adapter when layer ``index`` + 1 has one (``layer_inputs``: what that layer ran with, which an adapter that
        attends needs), then the model's final norm. A drafter that scores only part of the vocabulary starts here."""
        if self.exit_adapters is not None and index + 1 in self.exit_adapters.exit_layers:
            hidden = self.exit_adapters.adapt(index + 1, hidden, layer_inputs)
        if self.adapters is not None:
            hidden = self.adapters[index](hidden)
        return self.final_norm(hidden)

    def exit_logits(self, index: int, hidden: torch.Tensor, layer_inputs: dict | None = None) -> torch.Tensor:
        """Logits over the vocabulary at layer ``index`` (0-based) for states ``[..., H]`` (`exit_states`, then the
        LM head)."""
        return self.lm_head(self.exit_states(index, hidden, layer_inputs))

    @property
    def heads(self) -> nn.ModuleList:
        """What is trained as exit heads (the recipes' ``head_lr``): the per-layer adapters, or nothing."""
        return self.adapters if self.adapters is not None else nn.ModuleList()

    def share_heads(self) -> MultiExitLM:
        """Every exit through the model's own final norm and LM head (LayerSkip), dropping per-layer adapters."""
        self.adapters, self.exits = None, "shared"
        return self

    @property
    def shared_heads(self) -> bool:
        return self.adapters is None

    # -- training / tracing: every layer ----------------------------------------------------------------------
    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     layer_drop: Sequence[float] | None = None) -> list[torch.Tensor]:
        """Every layer's token states ``[B, T, H]`` (before its exit), teacher-forced. ``layer_drop`` (LayerSkip)
        gives one rate per layer: in training mode each row skips that layer with that probability (its state
        passes through unchanged); in eval mode it is ignored."""
        if layer_drop is not None and len(layer_drop) != self.num_layers:
            raise ValueError(f"layer_drop has {len(layer_drop)} rates for {self.num_layers} layers.")
        drop = layer_drop if self.training else None
        hidden, layer_inputs = self.embed(input_ids, attention_mask)
        states = []
        for i in range(self.num_layers):
            out = self.run_layer(i, hidden, layer_inputs)
            hidden = out if drop is None or drop[i] <= 0 else skip_rows(hidden, out, drop[i])
            states.append(hidden)
        return states

    @torch.no_grad()
    def check_layerwise(self, atol: float = 1e-4) -> float:
        """Prove that the layer-by-layer path equals the model's own forward on a right-padded batch (every exit's
        input state and the last exit's logits) and on one cached decoding step (logits, and every layer's keys and
        values); returns the largest difference, or raises `BackboneError`."""
        was_training = self.training
        self.eval()
        device = self.lm_head.weight.device
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(self.vocab_size, (2, 9), generator=generator).to(device)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        following = torch.randint(self.vocab_size, (2, 1), generator=generator).to(device)
        try:
            reference = self.lm(input_ids=ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
            ref_cache = getattr(reference, self._cache_keyword)
            cache = self.new_cache()
            hidden, layer_inputs = self.embed(ids, mask, cache)
            diffs = []
            keep = mask.bool()
            for i in range(self.num_layers):
                hidden = self.run_layer(i, hidden, layer_inputs)
                if i < self.num_layers - 1:  # the model's own last entry is after its final norm
                    diffs.append(float((hidden - reference.hidden_states[i + 1])[keep].abs().max()))
            diffs.append(float((self.lm_head(self.final_norm(hidden)) - reference.logits)[keep].abs().max()))
            step_mask = torch.cat([mask, torch.ones_like(following)], 1)
            ref_step = self.lm(input_ids=following, attention_mask=step_mask, use_cache=True,
                               **{self._cache_keyword: ref_cache})
            positions = torch.full_like(following, ids.shape[1])
            hidden, layer_inputs = self.embed(following, step_mask, cache, positions)
            for i in range(self.num_layers):
                hidden = self.run_layer(i, hidden, layer_inputs)
            diffs.append(float((self.lm_head(self.final_norm(hidden)) - ref_step.logits).abs().max()))
            for ours, theirs in zip(cache.layers, ref_cache.layers):
                diffs.append(float((ours.keys - theirs.keys).abs().max()))
                diffs.append(float((ours.values - theirs.values).abs().max()))
        except (TypeError, AttributeError, KeyError, RuntimeError, ValueError) as err:
            raise BackboneError(f"{type(self.lm).__name__} layers cannot be called one by one ({err}).") from err
        finally:
            self.train(was_training)
        diff = max(diffs)
        if not diff <= atol:
            raise BackboneError(
                f"Layer-by-layer forward of {type(self.lm).__name__} differs from its own forward by {diff:.3g}; this "
                "architecture needs inputs exitrl does not pass to its layers.")
        return diff

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory / "lm")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / "lm")
        if self.adapters is not None:
            torch.save(self.adapters.state_dict(), directory / "adapters.pt")
        meta = {"kind": "lm", "exits": self.exits, "num_layers": self.num_layers, **(extra or {})}
        (directory / "exitrl_backbone.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """A saved model in ``dtype``; returns ``(model, tokenizer, meta)``."""
        directory = Path(directory)
        meta_path = directory / "exitrl_backbone.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("kind") != "lm":
            raise BackboneError(f"{directory} is not a saved MultiExitLM (no exitrl_backbone.json of kind 'lm').")
        model = cls(AutoModelForCausalLM.from_pretrained(directory / "lm"), meta["exits"])
        if model.adapters is not None:
            model.adapters.load_state_dict(torch.load(directory / "adapters.pt", map_location="cpu",
                                                      weights_only=True))
        tokenizer = AutoTokenizer.from_pretrained(directory / "lm") if (directory / "lm" /
                                                                        "tokenizer_config.json").is_file() else None
        return model.to(device=device, dtype=dtype), tokenizer, meta
