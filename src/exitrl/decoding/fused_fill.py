"""The skipped layers' keys and values in one step (CALM's ``copy`` propagation, fused).

When a token leaves at layer j, every deeper layer still owes the tokens after it the keys and values of the exited
state h: k_l = rotary(W_k^l · norm_l(h)), v_l = W_v^l · norm_l(h). Done layer by layer this is about ten small
kernels per skipped layer (norm, two projections, rotary, two cache writes), which on a GPU cost more than the
layers a token skips. Two facts make it one step:

* an RMS norm is ``w_l ⊙ n(h)`` with ``n(h) = h / rms(h)`` the same for every layer, so ``W^l · norm_l(h) =
  (W^l · diag(w_l)) · n(h)``: each layer's norm weight folds into its projections;
* the folded key and value projections of layers l..L−1, stacked layer-major, are one matrix, so the rows for "from
  layer j on" are one contiguous slice: one matrix product, one rotary step (the rotary angles depend on the
  position only), and one write into a cache whose layers are one stacked tensor (`SlotCache` with ``layers``).

Built only for the layouts it is exact for (Llama, Mistral, Qwen2 with its projection biases, Qwen3 with its
per-head key norm) and checked against `MultiExitLM.write_keys_values` on random states when built; anything else
returns None and the engine fills layer by layer.
"""

from __future__ import annotations

import torch

from exitrl.backbones.multi_exit_lm import LLAMA_LIKE, MultiExitLM

FUSABLE_MODELS = ("llama", "mistral", "qwen2", "qwen3")


class FusedFill:
    """Every layer's folded key and value projections, stacked: ``weight [L, 2·kv·d, H]`` and ``bias [L, 2·kv·d]``
    (zeros where the model has none)."""

    def __init__(self, model: MultiExitLM):
        self.model, self.num_layers = model, model.num_layers
        attention = model.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.eps = float(model.layers[0].input_layernorm.variance_epsilon)
        weights, biases, key_norms = [], [], []
        with torch.no_grad():
            for layer in model.layers:
                attention, norm = layer.self_attn, layer.input_layernorm
                projection = torch.cat([attention.k_proj.weight, attention.v_proj.weight]).float()
                weights.append(projection * norm.weight.float()[None, :])
                bias = [getattr(attention, name).bias for name in ("k_proj", "v_proj")]
                biases.append(torch.cat([b.float() if b is not None else projection.new_zeros(len(projection) // 2)
                                         for b in bias]))
                key_norm = getattr(attention, "k_norm", None)
                if key_norm is not None:
                    key_norms.append(key_norm.weight.float())
        dtype = model.lm_head.weight.dtype
        self.weight = torch.stack(weights).to(dtype)
        self.bias = torch.stack(biases).to(dtype)
        self.has_bias = bool(self.bias.any())
        self.key_norm = torch.stack(key_norms).to(dtype) if key_norms else None
        self.key_norm_eps = float(getattr(model.layers[0].self_attn, "k_norm", None).variance_epsilon) \
            if key_norms else 0.0

    @classmethod
    def build(cls, model: MultiExitLM) -> FusedFill | None:
        """The fused fill for ``model``, or None where it is not exact for this architecture (checked)."""
        if model.layout != LLAMA_LIKE or model.config.model_type not in FUSABLE_MODELS:
            return None
        first = model.layers[0]
        norms = [layer.input_layernorm for layer in model.layers]
        if not all(type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")
                   and getattr(norm, "bias", None) is None for norm in norms):
            return None
        if len({float(norm.variance_epsilon) for norm in norms}) != 1 or not hasattr(first.self_attn, "k_proj"):
            return None
        fill = cls(model)
        return fill if fill.check() else None

    def __call__(self, first: int, state: torch.Tensor, layer_inputs: dict, slots: torch.Tensor) -> None:
        """Write layers first..L−1's keys and values of ``state [B, 1, H]`` at ``slots [1]`` into the stacked cache
        of ``layer_inputs["cache"]`` (a `SlotCache` with ``layers``)."""
        cache = layer_inputs["cache"]
        count, batch = self.num_layers - first, state.shape[0]
        x = state[:, 0].float()
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.weight.dtype)
        weight = self.weight[first:].flatten(0, 1)  # [count·2·kv·d, H], contiguous: layer-major
        if self.has_bias:
            projected = torch.addmm(self.bias[first:].flatten(), normed, weight.t())
        else:
            projected = normed @ weight.t()
        projected = projected.view(batch, count, 2, self.kv_heads, self.head_dim)
        keys, values = projected[:, :, 0], projected[:, :, 1]  # [B, count, kv, d]
        if self.key_norm is not None:  # Qwen3: each head's key normalised with its layer's weight
            k = keys.float()
            k = (k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + self.key_norm_eps)).to(keys.dtype)
            keys = self.key_norm[first:][None, :, None, :] * k
        cos, sin = layer_inputs["position_embeddings"]  # [B, 1, d]
        cos, sin = cos[:, None], sin[:, None]  # over layers and heads
        half = self.head_dim // 2
        keys = keys * cos + torch.cat((-keys[..., half:], keys[..., :half]), -1) * sin
        # [B, count, kv, d] -> [count, B, kv, 1, d], the stacked cache's layout at one slot
        cache.write_stacked(first, keys.transpose(0, 1)[:, :, :, None], values.transpose(0, 1)[:, :, :, None],
                            slots)

    @torch.no_grad()
    def check(self) -> bool:
        """Whether the fused fill writes what `MultiExitLM.write_keys_values` writes, layer by layer, on random
        states (the same tolerance as `MultiExitLM.keys_values_exact`)."""
        from exitrl.decoding.engine import SlotCache  # the engine imports this module

        model, device = self.model, self.weight.device
        generator = torch.Generator().manual_seed(2)
        ids = torch.randint(model.vocab_size, (2, 1), generator=generator).to(device)
        states = torch.randn(2, 1, model.hidden_size, generator=generator).to(device, self.weight.dtype)
        slots = torch.tensor([3], device=device)
        positions = torch.tensor([[3], [5]], device=device)
        fused, alone = SlotCache(6, self.num_layers), SlotCache(6, self.num_layers)
        hidden = model.embed_tokens(ids, positions)
        for cache in (fused, alone):
            cache.slots = slots
        inputs_fused = model.layer_inputs(hidden, positions, {}, fused)
        inputs_alone = model.layer_inputs(hidden, positions, {}, alone)
        first = 1 if self.num_layers > 1 else 0
        try:
            alone.allocate(states.new_zeros(2, self.kv_heads, 1, self.head_dim), self.num_layers)
            fused.allocate(states.new_zeros(2, self.kv_heads, 1, self.head_dim), self.num_layers)
            for index in range(first, self.num_layers):
                model.write_keys_values(index, states, inputs_alone)
            self(first, states, inputs_fused, slots)
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError):
            return False
        tolerance = 1e-4 if states.dtype == torch.float32 else 2e-2
        return torch.allclose(fused.key_stack, alone.key_stack, atol=tolerance, rtol=tolerance) and \
            torch.allclose(fused.value_stack, alone.value_stack, atol=tolerance, rtol=tolerance)

    def to(self, device: torch.device) -> FusedFill:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        if self.key_norm is not None:
            self.key_norm = self.key_norm.to(device)
        return self


def fused_fill_for(model: MultiExitLM) -> FusedFill | None:
    """``model``'s fused fill, built once per weight dtype and device and rebuilt when a key/value projection or an
    input norm has changed since (training updates weights in place, which bumps their version counters)."""
    parts = [p for layer in model.layers for p in layer.parameters()] if model.layout == LLAMA_LIKE else []
    key = (model.lm_head.weight.dtype, model.lm_head.weight.device, sum(p._version for p in parts),
           tuple(p.data_ptr() for p in parts[:1]))
    built = model.__dict__.get("_fused_fill")
    if built is None or built[0] != key:
        built = (key, FusedFill.build(model))
        model.__dict__["_fused_fill"] = built
    return built[1]
