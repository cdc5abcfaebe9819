"""One stage's training under FSDP2 (``distributed.sharding=fsdp``): a copy of the model, sharded over the
processes, trains; the plain model gets the gathered weights back whenever someone reads it.

Why a copy: a sharded module's every forward is a collective. Process 0 evaluating alone after an epoch, or the
sharded trace (whose processes run different numbers of batches), would wait forever on a sharded model. So the
plain model stays as it was (the weights only, no gradients or optimiser state, which is where training's memory
goes) and is refreshed with the full weights at each epoch's end and at the stage's end.

Units: each layer (``model.layers``) is its own FSDP unit, gathered only while it runs, and a `StageLoss` is the
root, owning the embeddings and the exit heads, so a recipe that calls the model's pieces (``embed``,
``run_layer``, ``exit_logits``) still finds them gathered.

Checkpoints stay the plain format (``model.state_dict()`` and an optimiser state numbered as the stage's groups
list the parameters), so a run resumes on any number of processes, with either sharding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from exitrl.backbones.recipes.base import Stage, StageLoss

ROOT = "model."  # the sharded copy's parameter names, seen from the StageLoss root


class ShardedStage:
    """The sharded copy of ``model`` for ``stage`` (built after the stage froze what it does not train): ``loss``
    is the module to call, ``groups`` the stage's AdamW groups over the copy's parameters."""

    def __init__(self, model: nn.Module, stage: Stage, device: torch.device, size: int):
        self.plain = model
        mesh = init_device_mesh(device.type, (size,))
        twin = copy.deepcopy(model)
        for layer in {id(layer): layer for layer in twin.layers}.values():  # ALBERT: one module at every depth
            fully_shard(layer, mesh=mesh)
        self.loss = fully_shard(StageLoss(twin, stage), mesh=mesh)
        names = {id(p): name for name, p in model.named_parameters()}
        twins = dict(twin.named_parameters())
        self.groups = [{**group, "params": [twins[names[id(p)]] for p in group["params"]]} for group in stage.groups]
        self.order = [ROOT + names[id(p)] for group in stage.groups for p in group["params"]]
        self.trained = [p for group in self.groups for p in group["params"]]

    @torch.no_grad()
    def gather(self) -> None:
        """Every process's plain model takes the full current weights, one parameter at a time (so the extra
        memory is one parameter, not one model). A collective: every process calls it, in the same order."""
        plain = dict(self.plain.named_parameters())
        for name, value in self.loss.model.named_parameters():
            plain[name].copy_(value.full_tensor() if isinstance(value, DTensor) else value)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimiser's full state in the plain format, on process 0 (empty elsewhere; a collective)."""
        state = get_optimizer_state_dict(self.loss, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not state:
            return {}
        number = {name: i for i, name in enumerate(self.order)}
        return {"state": {number[name]: value for name, value in state["state"].items()},
                "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                                 for group in state["param_groups"]]}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """A plain-format optimiser state (every process read the same checkpoint) into the sharded optimiser."""
        named = {"state": {self.order[i]: value for i, value in state["state"].items()},
                 "param_groups": [{**group, "params": [self.order[i] for i in group["params"]]}
                                  for group in state["param_groups"]]}
        # strict=False: a parameter that has had no gradient yet (BERT's unused pooler, a head no row reached) has
        # no state. torch fills every parameter's state by a dummy step before loading; such parameters must go
        # back to having none, as in the run that saved the checkpoint (AdamW's first step depends on it).
        set_optimizer_state_dict(self.loss, optimizer, named,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        for name, parameter in zip(self.order, self.trained, strict=True):
            if name not in named["state"]:
                optimizer.state.pop(parameter, None)
