"""A linear layer with a handful of outputs (an exit head over 2 labels, a policy's last layer), computed so that
torch.compile can fuse it. cuBLAS runs such a product as a kernel of its own that costs more than the arithmetic (a
[256, 384] x [384, 2] product takes about as long on an H100 as a [256, 384] x [384, 384] one); written as a multiply
and a sum, the compiler folds it into the kernel around it. Eagerly it stays one ``F.linear``, whose numbers training
and the trace walk see."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FUSED_OUTPUTS = 16  # at most this many outputs are written as a multiply and a sum under torch.compile


def small_linear(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear(x)``; under torch.compile, for at most `FUSED_OUTPUTS` outputs, as a multiply and a sum."""
    if not torch.compiler.is_compiling() or linear.out_features > FUSED_OUTPUTS:
        return F.linear(x, linear.weight, linear.bias)
    out = (x.unsqueeze(-2) * linear.weight).sum(-1)
    return out if linear.bias is None else out + linear.bias
