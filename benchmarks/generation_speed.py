"""Decoding speed and quality of every early-exit method on one model and one set of prompts (issue 17): tokens/s and
ROUGE-L against the full model's greedy output (and the perplexity of the produced text under the full model), at
batch 1 and 16, over each method's knob, beside the baselines a user has (transformers' eager and compiled
``generate``) and the peers a user would pick instead (transformers' ``assistant_early_exit``, ``economize``).

    # on the GPU machine (one model per call; --peers needs economize installed in this environment only)
    python benchmarks/generation_speed.py --model continued --out $OUT/continued
    python benchmarks/generation_speed.py --model continued --peers-only --out $OUT/continued_peers
    python benchmarks/generation_speed.py --model untouched --peers --out $OUT/untouched
    # here: table and plot from the points files (`generation_speed_report.py`)
    python benchmarks/generation_speed_report.py benchmarks/reference/generation_speed_h200_DATE.json \\
        $OUT/continued/points.json ...

``continued`` is SmolLM2-135M after the LayerSkip recipe of issue 16 (`benchmarks/layerskip_continual.py`'s arm:
8192 chunks of 256 tokens of GLUE sentences and Python sources, p_max 0.1, e_scale 1, rotational curriculum R = 4,
lr 5e-5), rerun in each call (the weights do not fit the way back). Prompts come from documents neither training nor
calibration saw (a hash split); CALM's Learn-then-Test and the learned policy's training use the third split.
Every run decodes ``--new-tokens`` tokens (no end-of-sequence stop), so tokens/s compares equal work. Timings: a
warm-up run per configuration (graph capture; the compiled baseline warms up twice on every batch, since its
step specializes on the prompt's shape), then CUDA-synchronised wall time over all prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
from lm_token_study import add_text_arguments

from exitrl.agents.free import FreePolicy
from exitrl.agents.inputs import FitInputs
from exitrl.agents.reinforce import ReinforceConfig, train_reinforce
from exitrl.backbones import FinetuneConfig
from exitrl.backbones.lm_training import continue_training
from exitrl.backbones.loading import load_multi_exit_lm
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.data.lm_text import glue_documents, pack, python_documents
from exitrl.decoding import (
    calibrate_calm,
    calm_decoding,
    free_decoding,
    greedy,
    perplexity,
    policy_decoding,
    rouge_l,
    self_speculative,
)
from exitrl.rewards import RewardSpec
from exitrl.traces.lm_run import split_documents
from exitrl.traces.tokens import build_token_split, state_projection
from exitrl.traces.trace import HELD_OUT

LAYERSKIP = {"objective": "layerskip", "layerskip_p_max": 0.1, "layerskip_e_scale": 1.0,
             "layerskip_curriculum": "rotational", "layerskip_rotation": 4}


# -- model, text, prompts ----------------------------------------------------------------------------------------
def smoke_model(tiny: bool) -> tuple[MultiExitLM, None]:
    """A model of SmolLM2-135M's shape (or a 4-layer one of width 64) with random weights, its LM head scaled so
    exits are not flat: a quick check of the machinery, not a result."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else \
        dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MultiExitLM(AutoModelForCausalLM.from_config(config))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model, None


def text_parts(args, tokenizer) -> dict[str, list[str]]:
    texts = [d for task in args.tasks for d in glue_documents(task, args.data_dir)]
    texts += python_documents(args.code_packages)
    parts = split_documents(texts, args.dev, args.policy)
    random.Random(0).shuffle(parts["train"])
    return parts


def prompts_from(tokenizer, documents: list[str], count: int, length: int, vocab: int) -> list[torch.Tensor]:
    """``count`` prompts of length−7..length tokens (so batches are left-padded), cut from packed documents."""
    if tokenizer is None:  # the smoke model: random ids
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(3, vocab, (length - i % 8,), generator=generator) for i in range(count)]
    chunks = pack(tokenizer, documents, length, count)
    if len(chunks) < count:
        raise SystemExit(f"only {len(chunks)} prompts of {length} tokens in this split; lower --prompts.")
    return [torch.tensor(c["input_ids"][i % 8:]) for i, c in enumerate(chunks)]


def batches_of(prompts: list[torch.Tensor], size: int, pad: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for first in range(0, len(prompts), size):
        rows = prompts[first:first + size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        out.append((ids.to(device), mask.to(device)))
    return out


# -- measuring ---------------------------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(decode, batches, device, warmups: int = 1, warm_all: bool = False) -> tuple[list[torch.Tensor], float,
                                                                                   list]:
    """``decode(ids, mask) -> (tokens [B, n], Generation or None)`` warmed up on the first batch (``warm_all``: on
    every batch, for a compiled step that specializes on the prompt's shape), then timed over all; returns the
    tokens, the seconds and the generations."""
    for _ in range(warmups):
        for ids, mask in batches if warm_all else batches[:1]:
            decode(ids, mask)
    sync(device)
    outputs, generations, started = [], [], time.perf_counter()
    for ids, mask in batches:
        tokens, generation = decode(ids, mask)
        outputs.append(tokens)
        generations.append(generation)
    sync(device)
    return outputs, time.perf_counter() - started, generations


def quality(model: MultiExitLM, batches, outputs, references) -> dict:
    scores, exact, ppl = [], 0, []
    for (ids, mask), out, ref in zip(batches, outputs, references):
        rows, ref_rows = out.tolist(), ref.tolist()
        scores += [rouge_l(a, b) for a, b in zip(rows, ref_rows)]
        exact += sum(a == b for a, b in zip(rows, ref_rows))
        ppl.append(math.log(perplexity(model, ids, mask, rows)))
    return {"rouge_l": round(statistics.fmean(scores), 4), "exact": round(exact / len(scores), 4),
            "perplexity": round(math.exp(statistics.fmean(ppl)), 3)}


class Recorder:
    """Points as they are measured, saved after each (a run cut by the time limit keeps what it measured)."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.data = out, {**meta, "points": []}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, point: dict) -> None:
        self.data["points"].append(point)
        (self.out / "points.json").write_text(json.dumps(self.data, indent=1))
        shown = {k: v for k, v in point.items() if k not in ("calibration",)}
        print(json.dumps(shown), flush=True)


def measure(recorder, model, name, knob, batches, batch, decode, references, device, baseline, warmups=1,
            extra=None, warm_all=False):
    outputs, seconds, generations = timed(decode, batches, device, warmups, warm_all)
    tokens = sum(o.numel() for o in outputs)
    point = {"method": name, "knob": knob, "batch": batch, "tokens": tokens, "seconds": round(seconds, 4),
             "tokens_per_s": round(tokens / seconds, 1), **quality(model, batches, outputs, references)}
    if baseline:
        point["speedup_vs_compiled"] = round(point["tokens_per_s"] / baseline["compiled"], 3)
        point["speedup_vs_graph_full"] = round(point["tokens_per_s"] / baseline["graph_full"], 3)
    known = [g for g in generations if g is not None]
    if known and known[0].exit_layers is not None:
        point["mean_exit_layer"] = round(statistics.fmean(float(g.exit_layers[:, 1:].float().mean())
                                                          for g in known), 2)
    if known and known[0].drafted:
        point["acceptance"] = round(sum(g.accepted for g in known) / sum(g.drafted for g in known), 3)
    point.update(extra or {})
    recorder.add(point)
    return point, outputs


# -- the methods -------------------------------------------------------------------------------------------------
def strided(model: MultiExitLM, stride: int) -> list[int]:
    """Exits at layers k, 2k, … (and the last): a head and a decision there only."""
    return list(range(stride, model.num_layers + 1, stride))


def ours(fn):
    def decode(ids, mask):
        generation = fn(ids, mask)
        return generation.tokens, generation
    return decode


def hf_generate(model: MultiExitLM, new: int, pad: int, **options):
    def decode(ids, mask):
        out = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=pad, **options)
        return out[:, ids.shape[1]:], None
    return decode


def fit_learned_policy(args, model, tokenizer, parts, device) -> tuple[object, torch.Tensor | None, dict]:
    """REINFORCE (ConsistentEE) on the token trace of the calibration split, with the label-free consistency
    reward (an exit that emits the last layer's token earns 1, minus α per layer)."""
    started = time.time()
    if tokenizer is None:  # the smoke model: random text
        generator = torch.Generator().manual_seed(1)
        chunks = [{"input_ids": torch.randint(3, model.vocab_size, (args.trace_length,), generator=generator)
                   .tolist()} for _ in range(args.trace_chunks)]
    else:
        chunks = pack(tokenizer, parts[HELD_OUT], args.trace_length, args.trace_chunks)
    split = build_token_split(model, chunks, args.top_k, args.state_dim, batch_size=16, device=device)
    cfg = ReinforceConfig(epochs=args.reinforce_epochs, seed=0)
    inputs = FitInputs.from_splits(split, reward=RewardSpec("consistency", kwargs={"alpha": args.alpha}),
                                   device=device)
    policy, info = train_reinforce(cfg, inputs)
    return policy, state_projection(model.hidden_size, args.state_dim, 0), {
        "rows": len(split), "seconds": round(time.time() - started, 1), "alpha": args.alpha,
        "epochs": args.reinforce_epochs}


def run_ours(args, recorder, model, tokenizer, parts, test, calib, device, pad, references, baselines):
    new = args.new_tokens
    if "selfspec" in args.methods:
        for batch, batches in test.items():
            for exit_layer in args.exit_layers:
                for draft in args.draft_tokens:
                    measure(recorder, model, "selfspec", {"exit_layer": exit_layer, "draft_tokens": draft}, batches,
                            batch, ours(lambda i, m, e=exit_layer, d=draft: self_speculative(
                                model, i, m, new, e, d)), references[batch], device, baselines[batch])
    if "calm" in args.methods:
        grids = {"margin": args.calm_thresholds, "saturation": args.saturation_thresholds}
        for measure_name in args.calm_measures:
            for batch, batches in test.items():
                for threshold in grids[measure_name]:
                    for stride in args.exit_strides:
                        measure(recorder, model, "calm", {"threshold": threshold, "measure": measure_name,
                                                          "exit_stride": stride}, batches, batch,
                                ours(lambda i, m, t=threshold, c=measure_name, k=stride: calm_decoding(
                                    model, i, m, new, threshold=t, measure=c, exit_layers=strided(model, k))),
                                references[batch], device, baselines[batch])
            calibration_batches = batches_of(calib, 16, pad, device)
            chosen, info = calibrate_calm(model, calibration_batches, new, delta=args.delta, epsilon=args.epsilon,
                                          measure=measure_name)
            print("CALM calibration", measure_name, json.dumps(info), flush=True)
            for batch, batches in test.items():
                knob = {"threshold": chosen, "measure": measure_name, "delta": args.delta, "epsilon": args.epsilon}
                if chosen is not None:
                    measure(recorder, model, "calm_ltt", knob, batches, batch,
                            ours(lambda i, m, c=measure_name, t=chosen: calm_decoding(model, i, m, new, threshold=t,
                                                                                       measure=c)),
                            references[batch], device, baselines[batch], extra={"calibration": info})
                else:
                    recorder.add({"method": "calm_ltt", "knob": knob, "batch": batch, "certified": False,
                                  "calibration": info})
    if "free" in args.methods:
        for batch, batches in test.items():
            for shallow in args.shallow_layers:
                for threshold in args.free_thresholds:
                    measure(recorder, model, "free", {"shallow_layer": shallow, "threshold": threshold}, batches,
                            batch, ours(lambda i, m, s=shallow, t=threshold: free_decoding(
                                model, i, m, new, shallow_layer=s, threshold=t, adaptive=False)),
                            references[batch], device, baselines[batch])
                policy = FreePolicy(shallow, 0.9, adaptive=True, refit_every=64)
                measure(recorder, model, "free_adaptive", {"shallow_layer": shallow, "start": 0.9}, batches, batch,
                        ours(lambda i, m, p=policy: free_decoding(model, i, m, new, policy=p)), references[batch],
                        device, baselines[batch])
                recorder.data["points"][-1]["final_threshold"] = policy.threshold
    if args.skip_policy or "reinforce" not in args.methods:
        return
    policy, projection, info = fit_learned_policy(args, model, tokenizer, parts, device)
    print("REINFORCE", json.dumps(info), flush=True)
    for batch, batches in test.items():
        for threshold in args.policy_thresholds:
            policy.threshold = threshold
            for stride in args.exit_strides:
                measure(recorder, model, "reinforce", {"threshold": threshold, "alpha": args.alpha,
                                                       "exit_stride": stride}, batches, batch,
                        ours(lambda i, m, k=stride: policy_decoding(model, policy, i, m, new, args.top_k, projection,
                                                                    exit_layers=strided(model, k))),
                        references[batch], device, baselines[batch], extra={"fit": info})


@torch.no_grad()
def draft_agreement(model: MultiExitLM, batches, references) -> list[float]:
    """Per layer, how often its exit's greedy token equals the last layer's on the full model's own output
    (teacher-forced over prompt + greedy continuation): the acceptance a draft from that layer can reach."""
    agree, count = torch.zeros(model.num_layers), 0
    for (ids, mask), out in zip(batches, references):
        sequence = torch.cat([ids, out[:, :-1]], 1)
        full_mask = torch.cat([mask, torch.ones_like(out[:, :-1])], 1)
        states = model.layer_states(sequence, full_mask)
        final = model.exit_logits(model.num_layers - 1, states[-1][:, ids.shape[1] - 1:]).argmax(-1)
        for index, state in enumerate(states):
            tokens = model.exit_logits(index, state[:, ids.shape[1] - 1:]).argmax(-1)
            agree[index] += float((tokens == final).sum())
        count += final.numel()
    return [round(100 * float(a) / count, 1) for a in agree]


def check_graphs(recorder, model, test, device, new: int) -> None:
    """Every method's captured path against its eager path (same code without graphs): the tokens must match."""
    from exitrl.agents.reinforce import ReinforcePolicy

    last = model.num_layers
    torch.manual_seed(0)
    untrained = ReinforcePolicy(last, 16, 9, hidden=32).to(device)
    projection = state_projection(model.hidden_size, 16, 0)
    methods = {"full": lambda i, m, g: greedy(model, i, m, new, graphs=g),
               "selfspec": lambda i, m, g: self_speculative(model, i, m, new, max(1, last // 4), 4, graphs=g),
               "calm": lambda i, m, g: calm_decoding(model, i, m, new, threshold=0.5, graphs=g),
               "free": lambda i, m, g: free_decoding(model, i, m, new, shallow_layer=max(1, last // 4),
                                                     threshold=0.5, adaptive=False, graphs=g),
               "policy": lambda i, m, g: policy_decoding(model, untrained, i, m, new, 8, projection, graphs=g)}
    for batch, batches in test.items():
        ids, mask = batches[0]
        for name, fn in methods.items():
            eager = fn(ids, mask, False).tokens
            captured = [fn(ids, mask, True).tokens for _ in range(2)]  # the capturing run and a replay
            same = [float((c == eager).float().mean()) for c in captured]
            recorder.add({"method": "graph_check", "of": name, "batch": batch, "token_match": same})


def run_peers(args, recorder, model, test, device, pad, references, baselines):
    new = args.new_tokens
    for exit_layer in args.exit_layers if "assistant" in args.peer_methods else ():
        if 1 in test:  # transformers' own self-speculative decoding: batch 1 only
            measure(recorder, model, "hf_assistant_early_exit", {"exit_layer": exit_layer}, test[1], 1,
                    hf_generate(model, new, pad, assistant_early_exit=exit_layer), references[1], device,
                    baselines[1])
    try:
        import economize
        from economize.techniques.dynamic_depth import CalmConfig
        from economize.techniques.early_exit import EarlyExitConfig
    except ImportError as err:
        raise SystemExit(f"--peers needs economize in this environment ({err}).") from err

    def economize_decode(efficient, decoding=None):
        def decode(ids, mask):
            prompts = [row[m.bool()] for row, m in zip(ids, mask)]
            results = efficient.decode_batch(prompts, new, decoding=decoding)
            return torch.stack([torch.as_tensor(r.tokens)[-new:] for r in results]).to(ids.device), None
        return decode

    for exit_layer in args.exit_layers if "economize_early_exit" in args.peer_methods else ():
        for draft in args.draft_tokens:
            decoding = economize.DecodeConfig(cycle_length=draft + 1, cuda_graphs=device.type == "cuda")
            efficient = economize.apply(model.lm, EarlyExitConfig(exit_layer=exit_layer, head="shared",
                                                                  adaptation="frozen"), decoding=decoding)
            for batch, batches in test.items():
                measure(recorder, model, "economize_early_exit", {"exit_layer": exit_layer, "draft_tokens": draft},
                        batches, batch, economize_decode(efficient, decoding), references[batch], device,
                        baselines[batch], warmups=3)  # economize records its graphs on the third call
            model.lm = efficient.detach()
    for threshold in args.calm_thresholds if "economize_calm" in args.peer_methods else ():
        efficient = economize.apply(model.lm, CalmConfig(confidence="softmax", threshold=threshold, min_layer=1,
                                                         decay_temperature=4.0, decay_horizon=new))
        for batch, batches in test.items():
            measure(recorder, model, "economize_calm", {"threshold": threshold}, batches, batch,
                    economize_decode(efficient), references[batch], device, baselines[batch])
        model.lm = efficient.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("continued", "untouched", "smoke", "smoke-tiny"), default="continued")
    add_text_arguments(parser)
    parser.add_argument("--train-chunks", type=int, default=8192)
    parser.add_argument("--train-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=32, help="batch 16: this many prompts")
    parser.add_argument("--prompts-batch1", type=int, default=8)
    parser.add_argument("--calibration-prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[4, 6, 8, 12])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--calm-thresholds", type=float, nargs="+", default=[0.99, 0.95, 0.9, 0.8, 0.6, 0.4])
    parser.add_argument("--calm-measures", nargs="+", default=["margin"], choices=["margin", "saturation"])
    parser.add_argument("--saturation-thresholds", type=float, nargs="+", default=[0.999, 0.995, 0.99, 0.98, 0.95])
    parser.add_argument("--methods", nargs="+", default=["selfspec", "calm", "free", "reinforce"],
                        choices=["selfspec", "calm", "free", "reinforce"], help="exitrl's methods to run")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--shallow-layers", type=int, nargs="+", default=[8])
    parser.add_argument("--free-thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.6, 0.4])
    parser.add_argument("--policy-thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.97])
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--reinforce-epochs", type=int, default=3)
    parser.add_argument("--trace-chunks", type=int, default=48)
    parser.add_argument("--trace-length", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--state-dim", type=int, default=16)
    parser.add_argument("--skip-policy", action="store_true")
    parser.add_argument("--skip-eager", action="store_true", help="no eager full-model baselines")
    parser.add_argument("--check-graphs", action="store_true", help="first: captured vs eager tokens per method")
    parser.add_argument("--peers", action="store_true", help="also transformers' assistant_early_exit, economize")
    parser.add_argument("--peers-only", action="store_true")
    parser.add_argument("--peers-first", action="store_true", help="the peers before exitrl's methods")
    parser.add_argument("--peer-methods", nargs="+", default=["assistant", "economize_early_exit", "economize_calm"],
                        choices=["assistant", "economize_early_exit", "economize_calm"])
    parser.add_argument("--exit-strides", type=int, nargs="+", default=[1],
                        help="CALM and the learned policy: exits at every k-th layer (a curve per k)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    if args.model.startswith("smoke"):
        model, tokenizer = smoke_model(args.model == "smoke-tiny")
        parts = None
    else:
        model, tokenizer = load_multi_exit_lm(args.backbone, args.package)
        parts = text_parts(args, tokenizer)
    meta = {"model": args.model, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "machine": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "args": {k: str(v) for k, v in vars(args).items()}, "num_layers": model.num_layers}
    import transformers

    meta["transformers"] = transformers.__version__
    recorder = Recorder(args.out, meta)
    if args.model == "continued":
        train = pack(tokenizer, parts["train"], args.train_length, args.train_chunks)
        cfg = FinetuneConfig(lr=args.lr, batch_size=16, epochs=1, warmup_ratio=0.05, weight_decay=0.01, seed=0,
                             **LAYERSKIP)
        torch.manual_seed(0)
        recorder.data["continued"] = continue_training(model, tokenizer, train, cfg, device)
        print("continued", json.dumps(recorder.data["continued"]), flush=True)
    dtype = getattr(torch, args.dtype)
    model.to(device, dtype).eval()
    model.lm.generation_config.eos_token_id = None  # equal work: every run decodes --new-tokens tokens
    pad = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    vocab = model.vocab_size
    documents = parts["dev"] if parts else None
    prompts = prompts_from(tokenizer, documents, max(args.prompts, args.prompts_batch1), args.prompt_length, vocab)
    calib = prompts_from(tokenizer, parts[HELD_OUT] if parts else None, args.calibration_prompts,
                         args.prompt_length, vocab)
    test = {b: batches_of(prompts[:args.prompts_batch1] if b == 1 else prompts[:args.prompts], b, pad, device)
            for b in args.batch_sizes}
    new = args.new_tokens
    if args.check_graphs:
        check_graphs(recorder, model, test, device, new)
    references, baselines = {}, {}
    for batch, batches in test.items():  # the full model three ways: ours (graphs), transformers eager, compiled
        references[batch] = timed(ours(lambda i, m: greedy(model, i, m, new)), batches, device)[0]
        graph_full, _ = measure(recorder, model, "full", {"engine": "exitrl graphs"}, batches, batch,
                                ours(lambda i, m: greedy(model, i, m, new)), references[batch], device, None)
        if not args.skip_eager:
            measure(recorder, model, "full", {"engine": "exitrl eager"}, batches, batch,
                    ours(lambda i, m: greedy(model, i, m, new, graphs=False)), references[batch], device, None)
            measure(recorder, model, "full", {"engine": "transformers eager"}, batches, batch,
                    hf_generate(model, new, pad), references[batch], device, None)
        compiled, _ = measure(recorder, model, "full", {"engine": "transformers static cache, compiled"}, batches,
                              batch, hf_generate(model, new, pad, cache_implementation="static"), references[batch],
                              device, None, warmups=2, warm_all=True)
        baselines[batch] = {"compiled": compiled["tokens_per_s"], "graph_full": graph_full["tokens_per_s"]}
        if batch == max(test):
            recorder.data["draft_agreement"] = draft_agreement(model, batches, references[batch])
            print("agreement with the last layer on the full model's output, per layer (%)",
                  recorder.data["draft_agreement"], flush=True)
        recorder.data.setdefault("baselines", {})[str(batch)] = baselines[batch]
    peers = args.peers or args.peers_only
    if peers and args.peers_first:
        run_peers(args, recorder, model, test, device, pad, references, baselines)
    if not args.peers_only:
        run_ours(args, recorder, model, tokenizer, parts, test, calib, device, pad, references, baselines)
    if peers and not args.peers_first:
        run_peers(args, recorder, model, test, device, pad, references, baselines)
    recorder.data["total_seconds"] = round(time.time() - started, 1)
    recorder.add({"method": "done"})


if __name__ == "__main__":
    main()
