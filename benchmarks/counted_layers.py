"""GPU time of one encoder layer, replayed as a CUDA graph: the eager layer on ``a`` rows (what a walk that reads
the alive count on the host launches) against the counted layer over the whole window with ``a`` of its rows alive
(`exitrl.runtime.counted_layer`: one graph whatever ``a`` is). Prints and saves JSON.

    python benchmarks/counted_layers.py --run runs/gpu_sst2 --out benchmarks/reference/counted_layers_h100.json
    python benchmarks/counted_layers.py --shape 384 6 12 1536 --out ...   # random weights of MiniLM-L6's shape

Times do not depend on the weights' values, so ``--shape`` (width, layers, heads, FFN width; bfloat16) needs no run.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import torch
from runtime_profile import save_record

from exitrl.backbones import MultiExitModel
from exitrl.runtime.classifier import EarlyExitClassifier
from exitrl.runtime.counted_layer import CountedLayers


def replay_us(fn, reps: int) -> float:
    """Mean GPU microseconds of ``fn`` captured as one CUDA graph and replayed ``reps`` times (after warm-up)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return 1000 * start.elapsed_time(end) / reps


def from_shape(width: int, layers: int, heads: int, ffn: int) -> MultiExitModel:
    """A BERT of this shape with random weights, on the GPU in bfloat16."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=ffn)
    return MultiExitModel(AutoModel.from_config(config), 2, "mean").eval().to("cuda", torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run folder (its backbone, in the dtype it loads in)")
    source.add_argument("--shape", nargs=4, type=int, metavar=("WIDTH", "LAYERS", "HEADS", "FFN"),
                        help="a randomly initialised BERT of this shape, in bfloat16")
    parser.add_argument("--rows", type=int, default=256, help="the window's rows")
    parser.add_argument("--seqs", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--alive", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.25, 0.125, 0.0])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--programs-per-sm", type=int, default=2,
                        help="the looping launch's programs per multiprocessor")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = from_shape(*args.shape) if args.shape else EarlyExitClassifier.from_run(args.run, "cuda").model
    counted = CountedLayers(model)
    # few programs, each looping over its tiles (and all heads of a sequence in one): fewer programs to start
    # past the alive rows
    programs = args.programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    looping = CountedLayers(model, programs=programs, heads_per_program=model.encoder.config.num_attention_heads)
    record = {"date": date.today().isoformat(), "torch": torch.__version__, "machine": torch.cuda.get_device_name(),
              "cpu": platform.processor(), "run": args.run, "shape": args.shape,
              "dtype": str(next(model.parameters()).dtype), "rows": args.rows, "looping_programs": programs,
              "points": []}
    torch.manual_seed(0)
    with torch.no_grad():
        for seq in args.seqs:
            ids = torch.randint(1000, 2000, (args.rows, seq), device="cuda")
            mask = torch.ones_like(ids)
            mask[:, seq // 2 + 3:] = 0  # half the tokens padding, as a length bucket leaves some
            hidden, inputs = model.embed(ids, mask, materialize_mask=True)
            keys = mask.to(hidden.dtype)
            for fraction in args.alive:
                alive = int(round(fraction * args.rows))
                point = {"seq": seq, "alive": alive}
                if alive:
                    part = hidden[:alive].clone()
                    sliced = {k: v[:alive] for k, v in inputs.items()}
                    point["eager_layer_us"] = replay_us(lambda p=part, s=sliced: model.run_layer(0, p, s), args.reps)
                work = hidden.clone()
                live = torch.tensor([alive], dtype=torch.int32, device="cuda")
                point["counted_layer_us"] = replay_us(lambda w=work, n=live, k=keys: counted.run(0, w, k, n), args.reps)
                # the alive rows anywhere in the window, read and written through an order (what the walk runs)
                order = torch.randperm(args.rows, device="cuda").to(torch.int32)
                point["counted_scattered_us"] = replay_us(
                    lambda w=work, n=live, k=keys, o=order: counted.run(0, w, k, n, o), args.reps)
                point["looping_scattered_us"] = replay_us(
                    lambda w=work, n=live, k=keys, o=order: looping.run(0, w, k, n, o), args.reps)
                if alive:  # the counted layer's answer on the alive rows against the eager layer's
                    expected = model.run_layer(0, hidden[:alive].clone(), {k: v[:alive] for k, v in inputs.items()})
                    work.copy_(hidden)
                    counted.run(0, work, keys, live)
                    real = mask[:alive].bool()
                    point["max_abs_diff"] = float((work[:alive] - expected)[real].abs().max())
                record["points"].append(point)
                print(f"seq {seq}, alive {alive}/{args.rows}: eager {point.get('eager_layer_us', 0):.1f} us, "
                      f"counted {point['counted_layer_us']:.1f} us "
                      f"(scattered {point['counted_scattered_us']:.1f}, "
                      f"looping {point['looping_scattered_us']:.1f}), diff {point.get('max_abs_diff', 0):.3g}")
        record["tiles"] = tile_sweep(counted, model, args.rows, args.seqs[0], args.reps)
    save_record(record, args.out)


def tile_sweep(counted: CountedLayers, model, rows: int, seq: int, reps: int) -> list[dict]:
    """Each of the layer's four matrix products, all rows alive, at several tile shapes (the default last)."""
    from exitrl.runtime.counted_kernels import linear

    parts, width = counted.layers[0], model.hidden_size
    dtype = next(model.parameters()).dtype
    live = torch.tensor([rows], dtype=torch.int32, device="cuda")
    tokens = rows * seq
    shapes = {"qkv": (width, parts["qkv_weight"], parts["qkv_bias"]), "out": (width, parts["out"].weight,
              parts["out"].bias), "up": (width, parts["up"].weight, parts["up"].bias),
              "down": (parts["up"].out_features, parts["down"].weight, parts["down"].bias)}
    found = []
    for name, (k, weight, bias) in shapes.items():
        x = torch.randn(tokens, k, device="cuda", dtype=dtype)
        out = torch.empty(tokens, weight.shape[0], device="cuda", dtype=dtype)
        reference = torch.nn.functional.linear(x, weight, bias)
        point = {"product": name, "tokens": tokens, "cublas_us": replay_us(
            lambda a=x, w=weight, b=bias: torch.nn.functional.linear(a, w, b), reps)}
        for tiles in [(128, 64, 64, 4), (128, 128, 64, 8), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                      (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 2),
                      (64, 128, 64, 4, 4), None]:
            try:
                us = replay_us(lambda a=x, w=weight, b=bias, o=out, t=tiles: linear(a, w, b, live, seq, o, blocks=t),
                               reps)
            except Exception as error:  # a tile too large for this GPU's shared memory
                point[str(tiles)] = f"failed: {str(error).splitlines()[0][:120]}"
                continue
            point[str(tiles)] = us
            point[f"{tiles} diff"] = float((out - reference).abs().max())
        found.append(point)
        print(f"tiles, {name} [{tokens} x {k}] -> {weight.shape[0]}: " + ", ".join(
            f"{key}: {value:.1f}" for key, value in point.items() if isinstance(value, float) and "diff" not in key))
    return found


if __name__ == "__main__":
    main()
