"""Train exit adapters (`exitrl.backbones.exit_adapters`) by distillation from the frozen model itself.

* **Text**: the frozen model's own samples (`sample_texts`): no corpus is needed, and they are the distribution the
  exits will see when the model decodes.
* **Target**: at every position, the last layer's next-token distribution; each exit's student distribution is
  ``head(final_norm(adapt(h_E)))``. The loss is KL(teacher ‖ student), summed over exits and averaged over
  positions, scaled by temperature² (so its gradients keep their size when the temperature changes).
* **Frozen trunk**: no trunk parameter gets a gradient or an update; exit states and the teacher's last state come
  from one ``no_grad`` pass per batch, so the last layer's output is unchanged by construction.
* **Memory**: the vocabulary-sized matrices exist for ``chunk`` positions at a time: the adapters' outputs are
  computed once (with their graph), the loss and its gradient are taken chunk by chunk against a detached copy,
  and the gathered gradient is sent back through the adapters once.
* **Resume**: with a checkpoint file the run saves adapters, optimiser and step every ``checkpoint_every`` steps
  and at its end (or when stopped by ``max_steps`` / ``max_seconds``), and continues from it; the batch order and
  the learning rate are functions of the step, so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exitrl.backbones.exit_adapters import ExitAdapters
from exitrl.backbones.multi_exit_lm import MultiExitLM
from exitrl.core.device import autocast

KL_KINDS = ("full", "top_k")


# -- the frozen model's own text ------------------------------------------------------------------------------
def check_sequences(sequences: torch.Tensor, attention_mask: torch.Tensor | None, name: str = "sequences") -> None:
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype.is_floating_point:
        raise ValueError(f"{name} must be token ids [N, T] (an integer tensor), got "
                         f"{getattr(sequences, 'shape', type(sequences).__name__)}.")
    if sequences.shape[0] < 1 or sequences.shape[1] < 2:
        raise ValueError(f"{name} must hold at least one sequence of two or more tokens, got {tuple(sequences.shape)}.")
    if attention_mask is not None and attention_mask.shape != sequences.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, {name} "
                         f"{tuple(sequences.shape)}: they must match.")


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position with padding before it not counted (as ``generate`` numbers left-padded rows)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def sample_mask(attention_mask: torch.Tensor | None, new_tokens: int, rows: int, prompt_length: int) -> torch.Tensor:
    """The attention mask of `sample_texts`' output: the prompts' mask, then ``new_tokens`` real tokens."""
    prompt = torch.ones(rows, prompt_length, dtype=torch.long) if attention_mask is None else attention_mask.long()
    return torch.cat([prompt.cpu(), torch.ones(rows, new_tokens, dtype=torch.long)], 1)


@torch.no_grad()
def sample_texts(model: MultiExitLM, prompts: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 new_tokens: int = 128, batch_size: int = 16, temperature: float = 1.0, top_p: float = 0.95,
                 seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[N, T + new_tokens]`` (on the CPU): left-padded ``prompts [N, T]`` each continued by ``new_tokens`` the
    frozen model samples. An end-of-sequence token does not stop a row (it is sampled like any token and the row
    goes on, as packed pretraining text does), so every row has the same length and the only padding is the
    prompts' (`sample_mask` gives the mask). The global RNG is left as it was."""
    check_sequences(prompts, attention_mask, "prompts")
    for key, value, low in (("new_tokens", new_tokens, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be a whole number >= {low}, got {value!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}.")
    device = torch.device(device)
    model.eval().to(device)
    options = {"do_sample": True, "max_new_tokens": new_tokens, "temperature": temperature, "top_p": top_p,
               "top_k": None, "eos_token_id": None,
               "pad_token_id": model.config.pad_token_id if model.config.pad_token_id is not None else 0}
    if device.type == "cuda":
        from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

        if "static" in ALL_CACHE_IMPLEMENTATIONS:
            options["cache_implementation"] = "static"
    mask = torch.ones_like(prompts) if attention_mask is None else attention_mask
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for first in range(0, prompts.shape[0], batch_size):
            ids = prompts[first:first + batch_size].to(device)
            generated = model.lm.generate(input_ids=ids, attention_mask=mask[first:first + batch_size].to(device),
                                          **options)
            out.append(generated[:, : prompts.shape[1] + new_tokens].cpu())
    return torch.cat(out)


# -- training ----------------------------------------------------------------------------------------------------
@dataclass
class DistillConfig:
    """How `distill` trains (every value checked on construction, each error naming its key)."""

    tokens: int = 1_000_000  # token positions to train on (padding included); steps = ceil(tokens / (batch × T))
    batch_size: int = 16  # sequences per step
    lr: float = 1e-3
    warmup_ratio: float = 0.05  # linear warmup over this fraction of the steps, then cosine decay to 0
    weight_decay: float = 0.0
    kl: str = "full"  # "full": the whole vocabulary; "top_k": the teacher's top_k tokens + the rest as one bucket
    top_k: int = 64
    temperature: float = 1.0
    seed: int = 0
    compile: bool = False  # torch.compile the per-chunk loss
    chunk: int = 1024  # positions per vocabulary-sized matrix in the loss
    log_every: int = 50  # steps per entry of the returned ``losses``
    checkpoint_every: int = 200  # steps between checkpoint saves (when a checkpoint file is given)
    clip_norm: float = 1.0  # gradient norm clipping on the adapters' parameters; 0: none

    def __post_init__(self):
        check_settings(self, ("tokens", "batch_size", "top_k", "chunk", "log_every", "checkpoint_every"),
                       (("lr", self.lr > 0, "> 0"), ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
                        ("weight_decay", self.weight_decay >= 0, ">= 0"), ("temperature", self.temperature > 0, "> 0"),
                        ("clip_norm", self.clip_norm >= 0, ">= 0")))
        _check_int("seed", self.seed, 0)
        if self.kl not in KL_KINDS:
            raise ValueError(f"DistillConfig.kl must be one of {', '.join(KL_KINDS)}, got {self.kl!r}.")
        if not isinstance(self.compile, bool):
            raise ValueError(f"DistillConfig.compile must be True or False, got {self.compile!r}.")


def _check_int(key: str, value, low: int, owner: str = "DistillConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{key} must be a whole number >= {low}, got {value!r}.")


def check_settings(cfg, whole: tuple[str, ...], numbers: tuple[tuple[str, bool, str], ...]) -> None:
    """A training config's checks: ``whole`` keys are whole numbers >= 1; each ``(key, ok, what)`` of ``numbers`` a
    finite number for which ``ok`` holds. Errors name the config class and the key."""
    owner = type(cfg).__name__
    for key in whole:
        _check_int(key, getattr(cfg, key), 1, owner)
    for key, ok, what in numbers:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
            raise ValueError(f"{owner}.{key} must be a number {what}, got {value!r}.")


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, kl: str, top_k: int, temperature: float) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ student) for logits ``[P, V]`` at ``temperature``. ``top_k`` compares the
    teacher's top_k tokens one by one and everything else as one bucket (a coarser, smaller KL that spends the
    student's capacity on the tokens that matter for greedy and nucleus decoding)."""
    log_q = F.log_softmax(student.float() / temperature, -1)
    log_p = F.log_softmax(teacher.float() / temperature, -1)
    if kl == "full":
        return (log_p.exp() * (log_p - log_q)).sum()
    top = log_p.topk(min(top_k, log_p.shape[-1]), -1).indices
    log_p_top, log_q_top = log_p.gather(-1, top), log_q.gather(-1, top)
    log_p_rest = log_p.scatter(-1, top, -math.inf).logsumexp(-1)  # the rest's mass, without 1 − Σ's cancellation
    log_q_rest = log_q.scatter(-1, top, -math.inf).logsumexp(-1)
    rest = torch.where(log_p_rest > -math.inf, log_p_rest.exp() * (log_p_rest - log_q_rest), 0.0)
    return (log_p_top.exp() * (log_p_top - log_q_top)).sum() + rest.sum()


def learning_rate(cfg, step: int, steps: int) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to zero."""
    warmup = int(cfg.warmup_ratio * steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class BatchOrder:
    """Which rows step ``s`` trains on: epochs of seeded permutations laid end to end (a function of the step
    alone, so a resumed run draws the same batches)."""

    def __init__(self, rows: int, batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._epochs: dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> torch.Tensor:
        picked = []
        for place in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch = place // self.rows
            if epoch not in self._epochs:
                self._epochs = {epoch: torch.randperm(self.rows, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch))} | {k: v for k, v in self._epochs.items() if k == epoch - 1}
            picked.append(int(self._epochs[epoch][place % self.rows]))
        return torch.tensor(picked)


def _fingerprint(adapters: ExitAdapters, sequences: torch.Tensor, mask: torch.Tensor, cfg: DistillConfig) -> dict:
    """What a checkpoint must match to be resumed: the settings, the adapters' shape and the training data."""
    digest = hashlib.sha256(sequences.cpu().long().numpy().tobytes())
    digest.update(mask.cpu().long().numpy().tobytes())
    return {**{f"DistillConfig.{k}": v for k, v in asdict(cfg).items() if k not in ("log_every", "compile")},
            "adapters.kind": adapters.kind, "adapters.depth": adapters.depth,
            "adapters.exit_layers": list(adapters.exit_layers), "adapters.base": adapters.architecture,
            "sequences": f"{tuple(sequences.shape)} sha256 {digest.hexdigest()[:16]}"}


def distill(model: MultiExitLM, adapters: ExitAdapters, sequences: torch.Tensor, cfg: DistillConfig,
            device: torch.device | str = "cpu", checkpoint: str | Path | None = None,
            on_log: Callable[[dict], None] | None = None, attention_mask: torch.Tensor | None = None,
            max_steps: int | None = None, max_seconds: float | None = None) -> dict:
    """Train ``adapters`` so each exit's distribution matches ``model``'s last layer on ``sequences [N, T]``
    (padding marked by ``attention_mask``, left or right). The trunk is frozen (and on CUDA cast to bf16, with bf16
    autocast; the adapters keep float32 weights). ``max_steps`` / ``max_seconds`` end this call early (after a
    checkpoint save, when a checkpoint file is given); a later call with the same arguments continues.

    Returns ``steps`` and ``tokens`` done in all (across resumes), ``seconds`` (training time in all),
    ``tokens_per_second``, ``losses`` (one ``{"step", "loss", "lr"}`` per ``log_every`` steps), ``lr`` (the last),
    ``finished`` and ``resumed_from`` (the step this call started at)."""
    from exitrl.core.checkpoint import load_checked, save_checked

    check_sequences(sequences, attention_mask)
    adapters.check_fits(model)
    device = torch.device(device)
    mask = torch.ones_like(sequences) if attention_mask is None else attention_mask.long()
    rows, length = sequences.shape
    steps = max(1, math.ceil(cfg.tokens / (cfg.batch_size * length)))
    order = BatchOrder(rows, cfg.batch_size, cfg.seed)
    work = _fingerprint(adapters, sequences, mask, cfg)

    flags = [p.requires_grad for p in model.parameters()]
    attached, was_training = model.exit_adapters, model.training
    model.requires_grad_(False)
    try:
        model.eval().to(device, torch.bfloat16 if device.type == "cuda" else None)
        model.attach_exit_adapters(None)  # exit_logits is then the bare head the adapters feed
        adapters.to(device).train()
        parameters = [p for p in adapters.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        start, losses, seconds_before = 0, [], 0.0
        if checkpoint is not None and Path(checkpoint).is_file():
            state = load_checked(checkpoint)
            for key, value in work.items():
                if state["work"].get(key) != value:
                    raise ValueError(f"Checkpoint {checkpoint} is of another run: {key}={state['work'].get(key)!r} "
                                     f"there, {value!r} here. Pass the same settings and text, or delete the file.")
            adapters.load_state_dict(state["adapters"])
            optimizer.load_state_dict(state["optimizer"])
            start, losses, seconds_before = state["step"], state["losses"], state["seconds"]

        def save(step: int, seconds: float) -> None:
            if checkpoint is not None:
                save_checked({"work": work, "adapters": adapters.state_dict(), "optimizer": optimizer.state_dict(),
                              "step": step, "losses": losses, "seconds": seconds}, checkpoint)

        loss_fn = torch.compile(_chunk_loss, dynamic=True) if cfg.compile else _chunk_loss
        step, pending, lr = start, [], learning_rate(cfg, max(start - 1, 0), steps)
        _synchronize(device)
        began = time.perf_counter()
        while step < steps:
            if max_steps is not None and step - start >= max_steps:
                break
            if max_seconds is not None and time.perf_counter() - began >= max_seconds:
                break
            rows_now = order(step)
            lr = learning_rate(cfg, step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pending.append(_train_step(model, adapters, sequences[rows_now].to(device), mask[rows_now].to(device),
                                       cfg, loss_fn, device))
            apply_gradients(optimizer, parameters, cfg.clip_norm)
            step += 1
            if step % cfg.log_every == 0 or step == steps:
                record = {"step": step, "loss": float(torch.stack(pending).mean()), "lr": lr}
                losses.append(record)
                pending = []
                if on_log is not None:
                    on_log(record)
            if step % cfg.checkpoint_every == 0 and step < steps:
                _synchronize(device)
                save(step, seconds_before + time.perf_counter() - began)
        _synchronize(device)
        seconds = seconds_before + time.perf_counter() - began
        if step > start or not (checkpoint is not None and Path(checkpoint).is_file()):
            save(step, seconds)
    finally:
        model.attach_exit_adapters(attached)
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(was_training)
        adapters.eval()
    tokens = step * cfg.batch_size * length
    return {"steps": step, "steps_planned": steps, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None, "losses": losses,
            "lr": lr, "finished": step >= steps, "resumed_from": start}


def apply_gradients(optimizer: torch.optim.Optimizer, parameters: list, clip_norm: float) -> None:
    """Clip the gradients' norm to ``clip_norm`` (0: no clipping), step, and clear them."""
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chunk_loss(model: MultiExitLM, index: int, student: torch.Tensor, teacher: torch.Tensor, kl: str, top_k: int,
                temperature: float) -> torch.Tensor:
    """Σ KL over a chunk of positions: ``student`` adapted states and ``teacher`` last-layer states, ``[P, H]``."""
    with torch.no_grad():
        target = model.exit_logits(model.num_layers - 1, teacher)
    return kl_sum(model.exit_logits(index, student), target, kl, top_k, temperature)


def _train_step(model: MultiExitLM, adapters: ExitAdapters, ids: torch.Tensor, mask: torch.Tensor,
                cfg: DistillConfig, loss_fn, device: torch.device) -> torch.Tensor:
    """One batch's gradients in the adapters; returns the loss (detached)."""
    exits = adapters.exit_layers
    with torch.no_grad(), autocast(device):
        hidden, inputs = model.embed(ids, mask, None, positions_of(mask))
        states = {}
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, inputs)
            if index + 1 in exits:
                states[index + 1] = hidden
    keep = mask.bool()
    teacher = hidden[keep]
    positions = teacher.shape[0]
    scale = cfg.temperature ** 2 / positions
    total = torch.zeros((), device=device)
    outputs, grads = [], []
    for exit_layer in exits:
        with autocast(device):
            adapted = adapters.adapt(exit_layer, states[exit_layer], inputs)[keep]
        detached = adapted.detach().requires_grad_(True)
        for first in range(0, positions, cfg.chunk):
            part = slice(first, first + cfg.chunk)
            with autocast(device):
                loss = loss_fn(model, exit_layer - 1, detached[part], teacher[part], cfg.kl, cfg.top_k,
                               cfg.temperature) * scale
            loss.backward()
            total += loss.detach()
        outputs.append(adapted)
        grads.append(detached.grad)
    torch.autograd.backward(outputs, grads)
    return total


# -- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def exit_agreement(model: MultiExitLM, sequences: torch.Tensor, exit_layers: Iterable[int], batch_size: int = 8,
                   device: torch.device | str = "cpu", attention_mask: torch.Tensor | None = None) -> dict[int, float]:
    """Per 1-indexed exit layer, the fraction of positions (all but each row's last; padding excluded) where the
    exit's greedy token is the last layer's, teacher-forced; through the attached exit adapters, if any."""
    check_sequences(sequences, attention_mask)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}.")
    requested = list(exit_layers)
    bad = [e for e in requested if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= model.num_layers]
    if bad or not requested:
        raise ValueError(f"exit_layers must name layers 1..{model.num_layers} (1-indexed); got {requested}.")
    wanted = sorted(set(requested))
    device = torch.device(device)
    model.eval().to(device)
    if model.exit_adapters is not None:
        model.exit_adapters.to(device).eval()
    mask = torch.ones_like(sequences) if attention_mask is None else attention_mask.long()
    agree = dict.fromkeys(wanted, 0)
    counted = 0
    for first in range(0, sequences.shape[0], batch_size):
        ids, rows_mask = sequences[first:first + batch_size].to(device), mask[first:first + batch_size].to(device)
        valid = rows_mask[:, :-1].bool()
        with autocast(device):
            hidden, inputs = model.embed(ids, rows_mask, None, positions_of(rows_mask))
            predictions = {}
            for index in range(model.num_layers):
                hidden = model.run_layer(index, hidden, inputs)
                if index + 1 in wanted or index + 1 == model.num_layers:  # the full sequence: adapters may attend
                    predictions[index + 1] = model.exit_logits(index, hidden, inputs)[:, :-1].argmax(-1)
        last = predictions[model.num_layers]
        for exit_layer in wanted:
            agree[exit_layer] += int(((predictions[exit_layer] == last) & valid).sum())
        counted += int(valid.sum())
    if counted == 0:
        raise ValueError("exit_agreement: no position to compare (every row is padding, or one token long).")
    return {exit_layer: agree[exit_layer] / counted for exit_layer in wanted}
