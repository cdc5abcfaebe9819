"""A BERT-style encoder layer whose work follows a row count held on the device (`counted_kernels`), so one
captured CUDA graph runs a layer on however many rows are still alive.

The device walk (`FastWalker(device_walk=True)`) needs each layer to cost what its alive rows cost while its
launches stay fixed. On torch with CUDA graph conditional nodes it captures one launch per row bucket and lets the
device pick one; without them (torch 2.11, what the lent GPUs run) it captures these layers instead: seven Triton
launches per layer (fused query/key/value, attention, output + residual, LayerNorm, feed-forward + GELU,
feed-forward + residual, LayerNorm), each returning at once from blocks past the alive rows.

They read the layer's own weights (no copy but the fused query/key/value matrix) and compute what the layer
computes, in its dtype with float32 accumulation: the numbers differ from the eager layer's by rounding only.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from exitrl.backbones.multi_exit import MultiExitModel


def triton_available() -> bool:
    """Whether Triton is installed (CUDA builds of torch ship it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): its kernels then run on CPU tensors, which is
    how the CPU tests run the counted layers' own code."""
    return triton_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _parts(layer: nn.Module) -> dict | None:
    """The modules of a BERT-style post-norm layer, or None when ``layer`` is not one."""
    try:
        attention = layer.attention
        parts = {"query": attention.self.query, "key": attention.self.key, "value": attention.self.value,
                 "out": attention.output.dense, "norm1": attention.output.LayerNorm,
                 "up": layer.intermediate.dense, "down": layer.output.dense, "norm2": layer.output.LayerNorm}
    except AttributeError:
        return None
    # plain floating-point linears (a quantized linear subclasses nn.Linear with other weights)
    linear = all(type(parts[name]) is nn.Linear and parts[name].bias is not None
                 and parts[name].weight.dtype.is_floating_point
                 for name in ("query", "key", "value", "out", "up", "down"))
    norms = all(isinstance(parts[name], nn.LayerNorm) for name in ("norm1", "norm2"))
    return parts if linear and norms else None


def counted_support(model: MultiExitModel) -> str | None:
    """Why ``model``'s layers cannot run as counted layers, or None when they can: BERT-style post-norm layers
    (BERT, MiniLM, RoBERTa, XLM-R, ELECTRA) with absolute positions and exact GELU."""
    config = model.encoder.config
    if any(_parts(layer) is None for layer in model.layers):
        return f"its layers ({type(model.layers[0]).__name__}) are not BERT-style post-norm layers"
    if getattr(config, "is_decoder", False):
        return "its layers are a decoder's"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"its attention adds {config.position_embedding_type} position scores"
    if config.hidden_size // config.num_attention_heads > 256:
        return f"its heads are {config.hidden_size // config.num_attention_heads} wide (the attention kernel takes 256)"
    if getattr(config, "hidden_act", None) != "gelu":
        return f"its activation is {getattr(config, 'hidden_act', None)!r}, not exact GELU"
    return None


class CountedLayers:
    """Every layer of ``model`` as counted layers: ``run(index, hidden, keys, alive, order=None)`` updates
    ``alive`` sequences of ``hidden`` ``[S, T, H]`` in place, the first ones or those ``order`` lists first (the
    others keep their values). ``keys`` ``[S, T]``: 1 for a real token. Raises ValueError for a model whose layers
    are not BERT-style (`counted_support`).

    ``programs`` (at most this many programs per product and LayerNorm, each looping over its tiles; None: one per
    tile) and ``heads_per_program`` (attention heads one program runs in turn) change how the work is launched, not
    what is computed: fewer programs cost less where most of a window's rows have left (a program past the alive
    rows still has to start). `benchmarks/counted_layers.py` times both."""

    def __init__(self, model: MultiExitModel, programs: int | None = None, heads_per_program: int = 1):
        reason = counted_support(model)
        if reason is not None:
            raise ValueError(f"Counted layers cannot run {model.encoder.config.model_type}: {reason}.")
        from exitrl.runtime.counted_kernels import attention, layer_norm, linear  # Triton: only where it runs

        self.linear, self.attention, self.layer_norm = linear, attention, layer_norm
        self.heads = int(model.encoder.config.num_attention_heads)
        if int(heads_per_program) < 1 or self.heads % int(heads_per_program):
            raise ValueError(f"heads_per_program must divide the model's {self.heads} heads, got {heads_per_program}.")
        if programs is not None and int(programs) < 1:
            raise ValueError(f"programs must be >= 1 (or None: one per tile), got {programs}.")
        self.programs, self.heads_per_program = programs, int(heads_per_program)
        self.layers = []
        for layer in model.layers:
            parts = _parts(layer)
            qkv_weight = torch.cat([parts[name].weight for name in ("query", "key", "value")]).contiguous()
            qkv_bias = torch.cat([parts[name].bias for name in ("query", "key", "value")]).contiguous()
            self.layers.append({**parts, "qkv_weight": qkv_weight, "qkv_bias": qkv_bias})

    @torch.no_grad()
    def run(self, index: int, hidden: torch.Tensor, keys: torch.Tensor, alive: torch.Tensor,
            order: torch.Tensor | None = None) -> None:
        """Layer ``index`` (0-based) on ``alive`` (a one-element int32 device tensor) sequences of ``hidden``, in
        place: the first ones, or those ``order`` (int32 ``[S]``) lists first, so a walk need not move its rows."""
        parts = self.layers[index]
        sequences, seq, width = hidden.shape
        if order is not None and (order.dtype != torch.int32 or order.numel() < sequences):
            raise ValueError(f"order must list the {sequences} sequences as int32 (the kernels read 32-bit "
                             f"places), got {order.numel()} of {order.dtype}.")
        x = hidden.view(sequences * seq, width)
        keys = keys.reshape(sequences * seq)
        # the inner buffers hold the alive sequences first (in ``order``'s order); only the first product and the
        # first residual read the window, and the last LayerNorm writes it
        n = self.programs
        qkv = self.linear(x, parts["qkv_weight"], parts["qkv_bias"], alive, seq, x.new_empty(x.shape[0], 3 * width),
                          index=order, gather_x=True, programs=n)
        context = self.attention(qkv, keys, alive, seq, self.heads, torch.empty_like(x), index=order,
                                 heads_per_program=self.heads_per_program)
        out = parts["out"]
        mixed = self.linear(context, out.weight, out.bias, alive, seq, torch.empty_like(x), residual=x, index=order,
                            gather_residual=True, programs=n)
        norm = parts["norm1"]
        attended = self.layer_norm(mixed, norm.weight, norm.bias, norm.eps, alive, seq, torch.empty_like(x),
                                   programs=n)
        up, down = parts["up"], parts["down"]
        inner = self.linear(attended, up.weight, up.bias, alive, seq, x.new_empty(x.shape[0], up.out_features),
                            gelu=True, programs=n)
        mixed = self.linear(inner, down.weight, down.bias, alive, seq, mixed, residual=attended, programs=n)
        norm = parts["norm2"]
        self.layer_norm(mixed, norm.weight, norm.bias, norm.eps, alive, seq, x, index=order, programs=n)
