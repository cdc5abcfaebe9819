"""What an exit costs the decoding engine (issue 30): a token that always leaves at layer E should cost what an
E-layer model costs. For E in ``--exits`` and each batch size, tokens/s of

* the E-layer model (the same weights cut after layer E, the model's own final norm and head) through exitrl's
  greedy engine: the ideal an exit at E can reach;
* every token leaving at E through the per-token engine (the static rule): the default engine (one step per
  segment between exit points, the skipped layers' keys and values in one fused step), and the same with each
  remedy turned off (``fused_fill=False``: layer by layer; ``read_ahead=True``: the next segment queued before the
  exit's flag is read), so each remedy's worth is measured, not assumed;
* the full model: exitrl greedy (CUDA graphs; and compiled with ``--compile``) and transformers' ``generate``
  with the static cache (compiled by transformers), the baseline a user would pick.

The model has SmolLM2-135M's shape (30 layers, width 576, 49,152 tokens) with random weights (``--model-dir``: a
saved `MultiExitLM` instead): the engine's cost does not depend on what the weights say, and every run decodes
``--new-tokens`` tokens with no end-of-sequence stop, so tokens/s compares equal work. Timings: warm-up runs (graph
capture, compilation), then the median of ``--reps`` CUDA-synchronised runs.

    python benchmarks/decoder_engine.py --out $OUT/decoder_engine.json              # on the GPU
    python benchmarks/decoder_engine.py --tiny --out /tmp/decoder_engine.json      # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from exitrl.agents.static import StaticPolicy
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.decoding import greedy, policy_decoding

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True)
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2)


def random_model(tiny: bool, dtype: torch.dtype, device: torch.device) -> MultiExitLM:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(TINY_SHAPE if tiny else SMOLLM2_SHAPE), max_position_embeddings=2048,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return MultiExitLM(AutoModelForCausalLM.from_config(config).eval()).to(device=device, dtype=dtype)


def cut_after(model: MultiExitLM, layers: int) -> MultiExitLM:
    """The same weights cut after ``layers`` layers (shared, not copied), with the model's own final norm and head:
    the E-layer model an exit at E is measured against."""
    lm = copy.copy(model.lm)
    lm._modules = dict(lm._modules)
    body = copy.copy(lm.model)
    body._modules = dict(body._modules)
    body.layers = nn.ModuleList(list(model.lm.model.layers[:layers]))
    lm._modules["model"] = body
    lm.config = copy.deepcopy(model.lm.config)
    lm.config.num_hidden_layers = layers
    if getattr(lm.config, "layer_types", None):
        lm.config.layer_types = lm.config.layer_types[:layers]
    return MultiExitLM(lm)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(decode, ids, mask, device, warmups: int, reps: int):
    """Median seconds of ``reps`` runs of ``decode(ids, mask)`` after ``warmups``, and the last run's output."""
    for _ in range(warmups):
        out = decode(ids, mask)
    seconds = []
    for _ in range(reps):
        sync(device)
        started = time.perf_counter()
        out = decode(ids, mask)
        sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), out


def agreement(cut: MultiExitLM, ids: torch.Tensor, tokens: torch.Tensor) -> float:
    """How many of an exit-at-E run's tokens after the first (the full model's) the E-layer model's own greedy
    continuation of prompt + that first token reproduces (1.0 in exact arithmetic; half precision may round a
    near-tie the other way, and a flip changes the rest of the row)."""
    prefix = torch.cat([ids, tokens[:, :1]], 1)
    follow = greedy(cut, prefix, torch.ones_like(prefix), tokens.shape[1] - 1, graphs=False).tokens
    return round(float((follow == tokens[:, 1:]).float().mean()), 4)


def hf_static(model: MultiExitLM, new: int):
    def decode(ids, mask):
        out = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0, cache_implementation="static")
        return out[:, ids.shape[1]:]
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 6-layer model of width 64 (a CPU smoke run)")
    parser.add_argument("--model-dir", default=None, help="a saved MultiExitLM instead of random weights")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--exits", type=int, nargs="+", default=None, help="default 8 15 24 (tiny: 2 3 5)")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also the full model with compiled steps")
    parser.add_argument("--compile-exits", action="store_true",
                        help="also the E-layer models and exits with compiled steps (minutes of compilation)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' compiled generate")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model_dir:
        model = MultiExitLM.load(args.model_dir, device, dtype)[0].eval()
    else:
        model = random_model(args.tiny, dtype, device)
    last = model.num_layers
    exits = args.exits or ([2, 3, 5] if args.tiny else [8, 15, 24])
    new = args.new_tokens
    modes = [False, True] if args.compile or args.compile_exits else [False]
    exit_modes = [False, True] if args.compile_exits else [False]
    rows = []

    def record(batch: int, name: str, seconds: float, **extra) -> dict:
        row = {"batch": batch, "method": name, "seconds": round(seconds, 5),
               "tokens_per_s": round(batch * new / seconds, 1), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, model.vocab_size, (batch, args.prompt_length), generator=generator).to(device)
        mask = torch.ones_like(ids)
        full = {}
        for compiled in modes:
            seconds, _ = timed(lambda i, m, c=compiled: greedy(model, i, m, new, compile=c).tokens, ids,
                                       mask, device, args.warmups, args.reps)
            full[compiled] = record(batch, "full greedy (exitrl)", seconds, compiled=compiled)
        if not args.no_hf and device.type == "cuda":
            seconds, _ = timed(hf_static(model, new), ids, mask, device, args.warmups + 1, args.reps)
            hf = record(batch, "full greedy (transformers static cache, compiled)", seconds)
            for compiled in modes:
                full[compiled]["over_transformers_compiled"] = round(full[compiled]["tokens_per_s"] /
                                                                     hf["tokens_per_s"], 3)
        for e in exits:
            cut = cut_after(model, e)
            for compiled in exit_modes:
                seconds, _ = timed(lambda i, m, c=compiled, k=cut: greedy(k, i, m, new, compile=c).tokens, ids,
                                            mask, device, args.warmups, args.reps)
                ideal = record(batch, "E-layer model (exitrl greedy)", seconds, exit_layer=e, compiled=compiled)
                variants = {"engine": {}, "layer-by-layer fill": {"fused_fill": False},
                            "read ahead": {"read_ahead": True}}
                for variant, options in variants.items():
                    def decode(i, m, o=options, c=compiled, layer=e):
                        return policy_decoding(model, StaticPolicy(layer), i, m, new, compile=c, **o)
                    seconds, out = timed(decode, ids, mask, device, args.warmups, args.reps)
                    same, engine = agreement(cut, ids, out.tokens), out.info
                    record(batch, f"exit at E ({variant})", seconds, exit_layer=e, compiled=compiled,
                           fused_fill=engine["fused_fill"], read_ahead=engine["read_ahead"],
                           of_e_layer_model=round(ideal["seconds"] / seconds, 3),
                           of_ideal_speedup=round(full[compiled]["seconds"] / seconds * e / last, 3),
                           tokens_equal_e_layer_model=same)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    import transformers

    out = {"date": datetime.date.today().isoformat(), "machine": gpu or f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "dtype": str(dtype).replace("torch.", ""), "model": args.model_dir or ("tiny" if args.tiny else
                                                                                  "SmolLM2-135M shape, random"),
           "layers": last, "settings": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'batch':>5} {'method':<52} {'E':>3} {'comp':>5} {'tok/s':>9} {'of E-model':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['method']:<52} {r.get('exit_layer', ''):>3} {str(r.get('compiled', '')):>5} "
              f"{r['tokens_per_s']:>9} {r.get('of_e_layer_model', r.get('over_transformers_compiled', '')):>10}")


if __name__ == "__main__":
    main()
