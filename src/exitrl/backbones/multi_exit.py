"""`MultiExitModel`: any Hugging Face encoder plus one exit head per layer, runnable layer by layer.

No modeling code is copied or forked: the wrapper calls the encoder's own embedding module and its own layer
modules one at a time, with the attention mask built by transformers' own mask utility and, where a family needs
more, its own helpers: ALBERT's embedding projection and layer groups shared across depth, MPNet's relative
position bias, DeBERTa-v2/v3's relative positions, relative embeddings, mask and first-layer convolution,
ModernBERT's rotary embeddings, full and sliding-window masks and final norm (which its exits read, as its own
output does).
Training uses the same layer-by-layer path as inference, and a construction-time self-check proves it equals the
model's ordinary forward, so an architecture whose layers need inputs exitrl does not pass is refused with a clear
error.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from exitrl.core.small_linear import small_linear

if TYPE_CHECKING:  # loading transformers' modeling code costs seconds; annotations do not need it
    from transformers import PreTrainedModel

POOLINGS = ("cls", "mean")
_LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers")


class BackboneError(ValueError):
    """The backbone cannot be loaded or driven layer by layer; the message says what to do."""


@dataclass
class MultiExitOutput:
    """Per-layer exit logits ``[B, L, C]`` and pooled states ``[B, L, H]``."""

    logits: torch.Tensor
    pooled: torch.Tensor


def _albert_layers(encoder: nn.Module) -> nn.ModuleList:
    """ALBERT runs one of ``num_hidden_groups`` layer groups at each depth (weights shared across depth)."""
    config = encoder.config
    groups = encoder.encoder.albert_layer_groups
    per_group = config.num_hidden_layers / config.num_hidden_groups
    return nn.ModuleList(groups[int(i / per_group)] for i in range(config.num_hidden_layers))


def _find_layers(encoder: nn.Module) -> nn.ModuleList:
    if encoder.config.model_type == "albert":
        return _albert_layers(encoder)
    for path in _LAYER_PATHS:
        module = encoder
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise BackboneError(
        f"Cannot find the layer list of {type(encoder).__name__} (looked at {', '.join(_LAYER_PATHS)}). "
        "exitrl drives BERT-style encoders (BERT, RoBERTa, MiniLM, ELECTRA, XLM-R, DistilBERT, ALBERT, MPNet) layer "
        "by layer."
    )


def _build_mask(encoder: PreTrainedModel, embedded: torch.Tensor, attention_mask: torch.Tensor,
                materialize: bool = False):
    """The encoder layers' attention mask, made by transformers' own utility for this version. ``materialize``
    always builds a tensor: the utility otherwise returns None when no row has padding, a choice made by reading
    the mask on the host, which a captured CUDA graph must not bake in."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.53
        return encoder.get_extended_attention_mask(attention_mask, attention_mask.shape)
    extra = {}
    if materialize:
        if "allow_is_bidirectional_skip" not in inspect.signature(create_bidirectional_mask).parameters:
            return encoder.get_extended_attention_mask(attention_mask, attention_mask.shape)
        extra["allow_is_bidirectional_skip"] = False
    return create_bidirectional_mask(config=encoder.config, inputs_embeds=embedded, attention_mask=attention_mask,
                                     **extra)


SHARED = "shared"  # the layer inputs every row shares (relative positions, rotary tables): never compacted


def select_rows(layer_inputs: dict, rows: torch.Tensor) -> dict:
    """Keep the rows still in the batch of every per-row layer input (the attention mask, a position bias)."""
    return {k: v if k == SHARED or v is None else v[rows] for k, v in layer_inputs.items()}


def skip_rows(inputs: torch.Tensor, outputs: torch.Tensor, rate: float) -> torch.Tensor:
    """Per row, keep the layer's ``outputs`` or, with probability ``rate``, its ``inputs`` (the layer skipped)."""
    skipped = torch.rand(inputs.shape[0], device=inputs.device) < rate
    return torch.where(skipped[:, None, None], inputs, outputs)


class MultiExitModel(nn.Module):
    """An encoder with an exit classifier after every layer.

    ``pooling`` is a backbone setting: ``cls`` (first token) for encoders trained with a [CLS] objective,
    ``mean`` (masked mean) for sentence encoders such as all-MiniLM-L6-v2, whose first-token states carry little
    before the last layers.
    """

    def __init__(self, encoder: PreTrainedModel, num_labels: int, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise BackboneError(f"Unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}.")
        self.encoder = encoder
        self.layers = _find_layers(encoder)
        self.embeddings = getattr(encoder, "embeddings", None)
        if self.embeddings is None:
            raise BackboneError(f"{type(encoder).__name__} has no `embeddings` module to run separately.")
        self.num_layers = len(self.layers)
        self.num_labels = num_labels
        self.pooling = pooling
        self.hidden_size = int(encoder.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(self.hidden_size, num_labels) for _ in range(self.num_layers))

    # -- the pieces inference calls one by one -------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              materialize_mask: bool = False) -> tuple[torch.Tensor, dict]:
        """Run the embedding module; returns the hidden states and what every layer takes besides them (the
        attention mask; MPNet's relative position bias), each with the batch as first dimension.
        ``materialize_mask``: always a mask tensor, never None (see `_build_mask`)."""
        family = self.encoder.config.model_type
        if family == "deberta-v2":  # its embeddings mask padding; its layers take the encoder's own 4-D mask
            token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)
            encoder = self.encoder.encoder  # shared inputs computed once per batch, as the encoder itself does
            return hidden, {"attention_mask": encoder.get_attention_mask(attention_mask), "input_mask": attention_mask,
                            SHARED: {"relative_pos": encoder.get_rel_pos(hidden),
                                     "rel_embeddings": encoder.get_rel_embedding()}}
        if family == "modernbert":  # one mask per attention type; each layer takes its own
            from transformers.masking_utils import create_bidirectional_sliding_window_mask

            hidden = self.embeddings(input_ids=input_ids)
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            kinds = {layer.attention_type for layer in self.layers}
            return hidden, {"full_attention": _build_mask(self.encoder, hidden, attention_mask, materialize_mask),
                            "sliding_attention": create_bidirectional_sliding_window_mask(
                                config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                **({"allow_is_bidirectional_skip": False} if materialize_mask else {})),
                            SHARED: {kind: self.encoder.rotary_emb(hidden, positions, kind) for kind in kinds}}
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.embeddings(**kwargs)
        layer_inputs = {"attention_mask": _build_mask(self.encoder, hidden, attention_mask, materialize_mask)}
        if family == "albert":  # embeddings are narrower than the layers: the encoder's own projection
            hidden = self.encoder.encoder.embedding_hidden_mapping_in(hidden)
        if family == "electra" and hasattr(self.encoder, "embeddings_project"):  # ELECTRA-small's, likewise
            hidden = self.encoder.embeddings_project(hidden)
        if family == "mpnet":
            layer_inputs["position_bias"] = self.encoder.encoder.compute_position_bias(hidden)
        return hidden, layer_inputs

    def run_layer(self, index: int, hidden: torch.Tensor, layer_inputs: dict) -> torch.Tensor:
        """Run layer ``index`` (0-based) of the encoder's own layers."""
        family = self.encoder.config.model_type
        if family == "deberta-v2":
            return self._run_deberta_layer(index, hidden, layer_inputs)
        if family == "modernbert":
            layer = self.layers[index]
            out = layer(hidden, attention_mask=layer_inputs[layer.attention_type],
                        position_embeddings=layer_inputs[SHARED][layer.attention_type])
            return out[0] if isinstance(out, tuple) else out
        out = self.layers[index](hidden, **layer_inputs)
        return out[0] if isinstance(out, tuple) else out

    def _run_deberta_layer(self, index: int, hidden: torch.Tensor, layer_inputs: dict) -> torch.Tensor:
        """DeBERTa-v2/v3: relative positions and embeddings shared by every row, and the convolution some
        checkpoints add after the first layer, all by the encoder's own methods."""
        encoder = self.encoder.encoder
        out = self.layers[index](hidden, layer_inputs["attention_mask"], **layer_inputs[SHARED])
        out = out[0] if isinstance(out, tuple) else out
        if index == 0 and encoder.conv is not None:
            out = encoder.conv(hidden, out, layer_inputs["input_mask"])
        return out

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The pooled state ``[B, H]``: the first token's, or the mean of the real tokens' (a batched matrix
        product, then a division: two kernels). ``weights``: `pool_weights` of the mask, when the caller keeps them
        (the fast path computes them once per batch)."""
        if self.encoder.config.model_type == "modernbert":
            hidden = self.encoder.final_norm(hidden)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask, count = self.pool_weights(attention_mask, hidden.dtype) if weights is None else weights
        return torch.bmm(mask, hidden).squeeze(1) / count

    @staticmethod
    def pool_weights(attention_mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean pooling's mask ``[B, 1, S]`` and token count ``[B, 1]`` (at least 1), in the hidden states' dtype."""
        mask = attention_mask.unsqueeze(1).to(dtype)
        return mask, mask.sum(-1).clamp_min(1.0)

    def exit_logits(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        head = self.heads[index]
        if isinstance(head, nn.Linear):  # fused with the pooling under torch.compile (`small_linear`)
            return small_linear(self.dropout(pooled), head)
        return head(self.dropout(pooled))

    # -- shared heads (LayerSkip: one classifier reads every layer) -----------------------------------------
    def share_heads(self) -> MultiExitModel:
        """Make every exit the last layer's head, so one classifier learns to read every layer's state."""
        last = self.heads[-1]
        for i in range(self.num_layers):
            self.heads[i] = last
        return self

    @property
    def shared_heads(self) -> bool:
        """Whether every exit uses one and the same head (recorded on save, restored on load)."""
        return self.num_layers > 1 and all(head is self.heads[-1] for head in self.heads)

    # -- training / tracing: every layer --------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, token_type_ids=None, *, detach_between: bool = False,
                layer_drop: Sequence[float] | None = None) -> MultiExitOutput:
        """Every layer's exit logits and pooled state.

        ``detach_between`` (SWEET) hands each layer a detached copy of the previous layer's output, so a layer
        (and the embeddings, through layer 1) gets gradient only from the exit head right after it.
        ``layer_drop`` (LayerSkip) gives one drop rate per layer: in training mode each row skips that layer
        (its state passes through unchanged) with that probability; in eval mode it is ignored, so tracing
        and inference always run every layer.
        """
        if layer_drop is not None and len(layer_drop) != self.num_layers:
            raise ValueError(f"layer_drop has {len(layer_drop)} rates for {self.num_layers} layers.")
        drop = layer_drop if self.training else None
        hidden, layer_inputs = self.embed(input_ids, attention_mask, token_type_ids)
        logits, pooled = [], []
        for i in range(self.num_layers):
            if detach_between and i > 0:
                hidden = hidden.detach()
            out = self.run_layer(i, hidden, layer_inputs)
            hidden = out if drop is None or drop[i] <= 0 else skip_rows(hidden, out, drop[i])
            p = self.pool(hidden, attention_mask)
            pooled.append(p)
            logits.append(self.exit_logits(i, p))
        return MultiExitOutput(torch.stack(logits, 1), torch.stack(pooled, 1))

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None) -> list[torch.Tensor]:
        """Every layer's token states through the layer-by-layer path, as the model's own ``hidden_states`` report
        them (ModernBERT reports its last layer after the final norm); used by the self-check and tests."""
        hidden, layer_inputs = self.embed(input_ids, attention_mask, token_type_ids)
        states = []
        for i in range(self.num_layers):
            hidden = self.run_layer(i, hidden, layer_inputs)
            states.append(hidden)
        if self.encoder.config.model_type == "modernbert":
            states[-1] = self.encoder.final_norm(states[-1])
        return states

    @torch.no_grad()
    def check_layerwise(self, tokenizer, atol: float = 1e-4) -> float:
        """Prove that the layer-by-layer path equals the encoder's own forward; returns the max difference."""
        was_training = self.training
        self.eval()
        batch = tokenizer(["a short one", "a somewhat longer second example sentence"], padding=True,
                          return_tensors="pt").to(next(self.parameters()).device)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        tt = batch.get("token_type_ids")
        try:
            ours = self.hidden_states(ids, mask, tt)
            ref = self.encoder(input_ids=ids, attention_mask=mask, token_type_ids=tt,
                               output_hidden_states=True).hidden_states[1:]
        except TypeError as err:
            raise BackboneError(f"{type(self.encoder).__name__} layers cannot be called one by one ({err}).") from err
        finally:
            self.train(was_training)
        keep = mask.bool()
        diff = max(float((a - b)[keep].abs().max()) for a, b in zip(ours, ref))
        if not diff <= atol:
            raise BackboneError(
                f"Layer-by-layer forward of {type(self.encoder).__name__} differs from its own forward by {diff:.3g}; "
                "this architecture needs inputs exitrl does not pass to its layers (e.g. relative positions)."
            )
        return diff

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, tokenizer=None, extra: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory / "encoder")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / "encoder")
        torch.save(self.heads.state_dict(), directory / "heads.pt")
        meta = {"num_labels": self.num_labels, "pooling": self.pooling, "num_layers": self.num_layers,
                "shared_heads": self.shared_heads, **(extra or {})}
        (directory / "exitrl_backbone.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        """Load a saved model in ``dtype`` (fp32 by default, whatever precision it was saved in, e.g. an fp16
        export); returns ``(model, tokenizer, meta)``."""
        directory = Path(directory)
        meta_path = directory / "exitrl_backbone.json"
        if not meta_path.is_file():
            raise BackboneError(f"{directory} is not a saved MultiExitModel (no exitrl_backbone.json).")
        meta = json.loads(meta_path.read_text())
        encoder = AutoModel.from_pretrained(directory / "encoder")
        model = cls(encoder, meta["num_labels"], meta["pooling"])
        if meta.get("shared_heads"):
            model.share_heads()
        model.heads.load_state_dict(torch.load(directory / "heads.pt", map_location="cpu", weights_only=True))
        tokenizer = AutoTokenizer.from_pretrained(directory / "encoder")
        return model.to(device=device, dtype=dtype), tokenizer, meta
