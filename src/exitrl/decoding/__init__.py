"""Decoding with a `MultiExitLM`: one engine (`exitrl.decoding.engine`: a slot KV cache, steps captured as CUDA
graphs on a GPU), the full model's greedy decoding, and the early-exit methods as strategies on it:
LayerSkip's self-speculative decoding, any `ExitPolicy` per token, CALM and FREE."""

from exitrl.decoding.calm import calibrate_calm, calm_decoding, decaying_threshold
from exitrl.decoding.engine import Engine, Generation
from exitrl.decoding.free import free_decoding
from exitrl.decoding.greedy import greedy
from exitrl.decoding.per_token import PROPAGATIONS, Decider, per_token_decoding, policy_decoding
from exitrl.decoding.quality import perplexity, rouge_l
from exitrl.decoding.self_speculative import check_self_speculative, self_speculative

__all__ = ["Decider", "Engine", "Generation", "PROPAGATIONS", "calibrate_calm", "calm_decoding",
           "check_self_speculative", "decaying_threshold", "free_decoding", "greedy", "per_token_decoding",
           "perplexity", "policy_decoding", "rouge_l", "self_speculative"]
