"""A causal-LM run's data side: offline text -> documents split into train / dev / policy -> the LM (loaded, or a
tiny random one; continued with a recipe when asked) -> token traces of each split, all cached by content.

The splits are by document (a hash of its text), so no sentence of a dev document is ever trained on, and the
policy split (``data.policy_split`` of the train documents) is text the backbone's continued training never saw.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from exitrl.backbones.finetune_config import FinetuneConfig
from exitrl.backbones.lm_training import continue_training
from exitrl.backbones.loading import load_multi_exit_lm, resolve_backbone_path, resolve_lm_path
from exitrl.backbones.multi_exit import BackboneError
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.core.checkpoint import Checkpoints, CorruptFile
from exitrl.core.distributed import barrier, current_world
from exitrl.core.hashing import hash_json
from exitrl.core.splits import HELD_OUT
from exitrl.data.lm_text import SOURCES, file_documents, glue_documents, pack, python_documents
from exitrl.traces.tokens import build_token_split
from exitrl.traces.trace import Trace

log = logging.getLogger(__name__)


@dataclass
class LMTextConfig:
    """``env.lm_text``: where the text comes from and how it becomes episodes."""

    sources: list[str] = field(default_factory=lambda: ["glue"])  # glue | python | files
    glue_tasks: list[str] = field(default_factory=lambda: ["rte"])
    packages: list[str] = field(default_factory=lambda: ["exitrl"])  # python: sources of installed packages
    files: list[str] = field(default_factory=list)  # files: one document per line
    length: int = 64  # tokens per chunk; each chunk gives length - 1 episodes
    dev: float = 0.2  # fraction of documents for dev
    max_chunks: dict = field(default_factory=lambda: {"train": 256, "dev": 64, "policy": 128})
    top_k: int = 8  # log-probabilities kept per exit
    state_dim: int | None = 64  # token states projected to this many features (null: kept whole)

    def __post_init__(self):
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise ValueError(f"env.lm_text.sources={list(self.sources)}: valid: {', '.join(SOURCES)}.")
        if not 0.0 < self.dev < 1.0:
            raise ValueError(f"env.lm_text.dev={self.dev} is out of range: it must lie in (0, 1).")
        if int(self.length) < 2 or int(self.top_k) < 2:
            raise ValueError(f"env.lm_text.length and top_k must be >= 2, got {self.length} and {self.top_k}.")


@dataclass
class LMBackboneConfig:
    """``backbone`` for ``kind: lm``: a pretrained causal LM by name (or inside a package), or a tiny random one
    (``random``: its shape) with the tokenizer of ``tokenizer``; ``continue_training`` runs the recipe of
    ``backbone.finetune`` on the train documents before tracing."""

    name: str | None = None
    package: str | None = None
    exits: str = "shared"
    random: dict | None = None
    tokenizer: str | None = None
    tokenizer_package: str | None = None
    continue_training: bool = False


def documents(text: LMTextConfig, data_dir: str | None) -> list[str]:
    found = []
    for source in text.sources:
        if source == "glue":
            found += [d for task in text.glue_tasks for d in glue_documents(task, data_dir)]
        elif source == "python":
            found += python_documents(list(text.packages))
        else:
            found += file_documents(list(text.files))
    return found


def split_documents(texts: list[str], dev: float, policy: float) -> dict[str, list[str]]:
    """train / dev / policy by a hash of each document: dev takes ``dev`` of them, the policy split ``policy`` of
    the rest."""
    parts: dict[str, list[str]] = {"train": [], "dev": [], HELD_OUT: []}
    for text in dict.fromkeys(texts):  # each distinct document once, in order
        u = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
        if u < dev:
            parts["dev"].append(text)
        elif (u - dev) / (1 - dev) < policy:
            parts[HELD_OUT].append(text)
        else:
            parts["train"].append(text)
    if not policy:
        del parts[HELD_OUT]
    for name, part in parts.items():
        if not part:
            raise ValueError(f"lm_text: the {name} split has no documents ({len(texts)} in all); give more text.")
    return parts


def load_lm(backbone: LMBackboneConfig, seed: int = 0):
    """``(MultiExitLM, tokenizer)``: the named model, or a tiny random one of shape ``backbone.random``."""
    if backbone.random is None:
        if not backbone.name:
            raise BackboneError("backbone.name is empty: name a causal LM (hub id, folder or .gguf file) or give "
                                "backbone.random (a tiny random model's shape).")
        return load_multi_exit_lm(backbone.name, backbone.package, backbone.exits)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = dict(backbone.random)
    family = shape.pop("family", "llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path(backbone.tokenizer, backbone.tokenizer_package))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=eos, **shape)
    torch.manual_seed(seed)
    model = MultiExitLM(AutoModelForCausalLM.from_config(config).eval(), backbone.exits)
    model.check_layerwise()
    return model, tokenizer


def load_or_build_lm_trace(backbone: LMBackboneConfig, finetune: FinetuneConfig, text: LMTextConfig,
                           data_dir: str | None, policy_split: float, cache_dir: str | Path, device: torch.device,
                           seed: int = 0, checkpoint_seconds: float = 300.0) -> tuple[Trace, MultiExitLM, object, dict]:
    """The token trace of every split, from the cache when this exact work was done before."""
    texts = documents(text, data_dir)
    parts = split_documents(texts, text.dev, policy_split)
    data_key = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
    trained = asdict(finetune) if backbone.continue_training else None
    # the same name may mean other weights (the hub's full precision, or a quantized GGUF where the hub is unreachable)
    named = backbone.random is None and backbone.name
    weights = resolve_lm_path(backbone.name, backbone.package).source if named else None
    seed_matters = backbone.random or trained
    key = hash_json({"backbone": asdict(backbone), "weights": weights, "finetune": trained, "text": asdict(text),
                     "data": data_key, "policy_split": policy_split, "seed": seed if seed_matters else None})
    cache = Path(cache_dir).expanduser()
    trace_path, model_dir = cache / "lm_traces" / f"{key}.pt", cache / "lm_backbones" / key
    model, tokenizer = (MultiExitLM.load(model_dir)[:2] if (model_dir / "exitrl_backbone.json").is_file()
                        else load_lm(backbone, seed))
    info = {"name": backbone.name or f"random {backbone.random}", "kind": "lm", "key": key,
            "package": backbone.package, "weights": model.weights_source,
            "documents": {k: len(v) for k, v in parts.items()}}
    if (model_dir / "exitrl_backbone.json").is_file():
        info["path"] = str(model_dir)  # the continued LM a run decodes with (`exitrl.generate RUN_DIR`)
    # a continued LM's trace is reused only with the continued LM it came from (a run may decode with it)
    if trace_path.is_file() and (not backbone.continue_training or model_dir.is_dir()):
        try:
            trace = Trace.load(trace_path)
            log.info("Token trace from the cache: %s", trace_path)
            return trace, model, tokenizer, info
        except (CorruptFile, ValueError) as err:
            log.warning("%s; rebuilding the token trace.", err)
    chunks = {name: pack(tokenizer, part, int(text.length), text.max_chunks.get(name)) for name, part in parts.items()}
    empty = [name for name, c in chunks.items() if not c]
    if empty:
        raise ValueError(f"lm_text: the {', '.join(empty)} split(s) give no chunk of {text.length} tokens; give more "
                         "text or lower env.lm_text.length.")
    if backbone.continue_training and not model_dir.is_dir():
        checkpoints = Checkpoints(cache / "lm_backbones" / f"{key}.checkpoint", checkpoint_seconds, work=key)
        info["continued"] = continue_training(model, tokenizer, chunks["train"], finetune, device, checkpoints)
        if current_world().is_main:  # under several processes, process 0 writes
            model.save(model_dir, tokenizer, extra={"continued": info["continued"]})
            checkpoints.clear()
        info["path"] = str(model_dir)
    splits = {name: build_token_split(model, c, int(text.top_k), text.state_dim, device=device, seed=seed)
              for name, c in chunks.items()}
    trace = Trace(splits, {"key": key, "kind": "tokens", "task": "lm_text", "metric": "accuracy",
                           "top_k": int(text.top_k), "state_dim": text.state_dim, "length": int(text.length),
                           "chunks": {k: len(v) for k, v in chunks.items()}})
    if current_world().is_main:
        trace.save(trace_path)
    barrier()
    return trace, model, tokenizer, info
