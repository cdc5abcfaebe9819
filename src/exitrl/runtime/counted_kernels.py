"""Triton kernels that read how many rows to work on from the device: the pieces of a `counted_layer`.

A CUDA graph fixes every launch's grid, so a captured layer costs the same whether 256 rows are alive or 16. These
kernels take the grid of the whole window but load the number of alive sequences from a device tensor (the first
ones, or those an index lists first) and return at once from any block past them: the layer's work follows
the alive rows (to within one block) with no host read, so a window's whole walk is one plain CUDA graph on any
torch with Triton, where `exitrl.core.graphs.run_if` needs conditional nodes (torch 2.13).

Rows that are not alive are never written: buffers keep what they held. Every kernel works on row-major 2-D views
``[sequences * seq, features]``; a sequence's tokens are ``seq`` consecutive rows. Where the alive sequences are not
the first ones, an ``index`` (int32, on the device) lists where they are: the kernel that reads the window's hidden
states gathers them through it and the one that writes them back scatters, so a walk never moves rows to put the
alive ones first (the layer's inner buffers hold the alive sequences in the index's order).

Imported only where Triton is installed (CUDA builds of torch ship it); tests run these same kernels on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row(offs, rows, index_ptr, seq, GATHER: tl.constexpr):
    """Where logical rows ``offs`` lie: themselves, or (``GATHER``) token ``offs % seq`` of sequence
    ``index[offs // seq]``; int64, since a window of long rows passes 2**31 elements."""
    if GATHER:
        sequence = tl.load(index_ptr + offs // seq, mask=offs < rows, other=0).to(tl.int64)
        return sequence * seq + offs % seq
    return offs.to(tl.int64)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, alive_ptr, index_ptr, seq, M, N, K: tl.constexpr,
                   GELU: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
                   GATHER_X: tl.constexpr, GATHER_RES: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = x[m, :] . w[n, :] + b[n] (then exact GELU, or + res[m, n]) for the rows of alive sequences;
    ``x`` and ``res`` rows read through the index where asked. Each program takes ``TILES_PER_PROGRAM`` tiles, a
    grid's width apart (1: a program per tile). Loop bounds are compile-time constants (``K`` too: a model has two,
    its width and its feed-forward width): Triton 3.6's interpreter loops only over constants (3.9's over any
    int)."""
    blocks_n = tl.cdiv(N, BLOCK_N)
    rows = tl.minimum(tl.load(alive_ptr).to(tl.int32) * seq, M)
    for step in range(TILES_PER_PROGRAM):
        tile = tl.program_id(0) + step * tl.num_programs(0)
        if (tile // blocks_n) * BLOCK_M < rows:  # tiles run row block by row block: past the alive rows, none
            _linear_tile(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, index_ptr, seq, rows, N, K, tile // blocks_n,
                         tile % blocks_n, GELU, RESIDUAL, IEEE, GATHER_X, GATHER_RES, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _linear_tile(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, index_ptr, seq, rows, N, K: tl.constexpr, pid_m, pid_n,
                 GELU: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr, GATHER_X: tl.constexpr,
                 GATHER_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``BLOCK_M`` x ``BLOCK_N`` tile of `_linear_kernel`."""
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    x_rows = _row(offs_m, rows, index_ptr, seq, GATHER_X)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(x_ptr + x_rows[:, None] * K + ks[None, :], mask=(offs_m[:, None] < rows) & (ks[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * K + ks[:, None], mask=(offs_n[None, :] < N) & (ks[:, None] < K),
                    other=0.0)
        if IEEE:  # float32 weights: float32 products (Triton would take TF32)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    keep = (offs_m[:, None] < rows) & (offs_n[None, :] < N)
    if RESIDUAL:
        res_rows = _row(offs_m, rows, index_ptr, seq, GATHER_RES)
        acc += tl.load(res_ptr + res_rows[:, None] * N + offs_n[None, :], mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _attention_kernel(qkv_ptr, keys_ptr, out_ptr, alive_ptr, index_ptr, seq, width, scale, IEEE: tl.constexpr,
                      GATHER_KEYS: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_BLOCKS: tl.constexpr,
                      HEADS_PER_PROGRAM: tl.constexpr):
    """Softmax attention of ``HEADS_PER_PROGRAM`` heads of one alive sequence over a block of its queries, keys
    masked by ``keys`` (1 for a real token; the window's, read through the index where asked); queries, keys and
    values side by side in ``qkv`` rows (``3 * width`` wide)."""
    block, heads, sequence = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if sequence >= tl.load(alive_ptr).to(tl.int32):
        return
    base = sequence.to(tl.int64) * seq
    if GATHER_KEYS:
        key_base = tl.load(index_ptr + sequence).to(tl.int64) * seq
    else:
        key_base = base
    for step in range(HEADS_PER_PROGRAM):
        _attention_head(qkv_ptr, keys_ptr, out_ptr, base, key_base, block, heads * HEADS_PER_PROGRAM + step, seq,
                        width, scale, IEEE, HEAD, HEAD_PAD, BLOCK_M, BLOCK_N, KEY_BLOCKS)


@triton.jit
def _attention_head(qkv_ptr, keys_ptr, out_ptr, base, key_base, block, head, seq, width, scale, IEEE: tl.constexpr,
                    HEAD: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    KEY_BLOCKS: tl.constexpr):
    """One head of `_attention_kernel`: flash-style, keys a block at a time with a running maximum."""
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    in_head = offs_d < HEAD
    stride = 3 * width
    q = tl.load(qkv_ptr + (base + offs_m[:, None]) * stride + head * HEAD + offs_d[None, :],
                mask=(offs_m[:, None] < seq) & in_head[None, :], other=0.0)
    best = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_PAD), dtype=tl.float32)
    for key_block in range(KEY_BLOCKS):  # ceil(seq / BLOCK_N), a constant (see `_linear_kernel`)
        offs_n = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = offs_n < seq
        k = tl.load(qkv_ptr + (base + offs_n[None, :]) * stride + width + head * HEAD + offs_d[:, None],
                    mask=inside[None, :] & in_head[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, k, input_precision="ieee") * scale
        else:
            scores = tl.dot(q, k) * scale
        real = tl.load(keys_ptr + key_base + offs_n, mask=inside, other=0.0) > 0
        # a padding key weighs nothing beside a real one (a row of padding only: all alike, as the eager layer
        # does); a column past the sequence never counts (-inf: the first block always has a column inside)
        scores = tl.where(real[None, :], scores, -1.0e30)
        scores = tl.where(inside[None, :], scores, -float("inf"))
        top = tl.maximum(best, tl.max(scores, 1))
        weights = tl.exp(scores - top[:, None])
        fade = tl.exp(best - top)
        total = total * fade + tl.sum(weights, 1)
        v = tl.load(qkv_ptr + (base + offs_n[:, None]) * stride + 2 * width + head * HEAD + offs_d[None, :],
                    mask=inside[:, None] & in_head[None, :], other=0.0)
        if IEEE:
            acc = acc * fade[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * fade[:, None] + tl.dot(weights.to(v.dtype), v)
        best = top
    acc = acc / total[:, None]
    tl.store(out_ptr + (base + offs_m[:, None]) * width + head * HEAD + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < seq) & in_head[None, :])


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, alive_ptr, index_ptr, seq, M, N, eps, SCATTER: tl.constexpr,
                       BLOCKS_PER_PROGRAM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """LayerNorm of the rows of alive sequences, ``BLOCK_ROWS`` rows a block, ``BLOCKS_PER_PROGRAM`` blocks a grid's
    width apart a program; written through the index where asked."""
    rows = tl.minimum(tl.load(alive_ptr).to(tl.int32) * seq, M)
    for step in range(BLOCKS_PER_PROGRAM):
        first = (tl.program_id(0) + step * tl.num_programs(0)) * BLOCK_ROWS
        if first < rows:
            _layer_norm_block(x_ptr, w_ptr, b_ptr, out_ptr, index_ptr, seq, rows, N, eps, first, SCATTER,
                              BLOCK_ROWS, BLOCK_N)


@triton.jit
def _layer_norm_block(x_ptr, w_ptr, b_ptr, out_ptr, index_ptr, seq, rows, N, eps, first, SCATTER: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of rows of `_layer_norm_kernel`."""
    offs_r = (first + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    keep = (offs_r[:, None] < rows) & (offs_n[None, :] < N)
    x = tl.load(x_ptr + offs_r[:, None] * N + offs_n[None, :], mask=keep, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / N
    centred = tl.where(keep, x - mean[:, None], 0.0)
    inverse = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / N + eps)
    w = tl.load(w_ptr + offs_n, mask=offs_n < N, other=1.0).to(tl.float32)
    b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = centred * inverse[:, None] * w[None, :] + b[None, :]
    out_rows = _row(offs_r, rows, index_ptr, seq, SCATTER)
    tl.store(out_ptr + out_rows[:, None] * N + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=keep)


def _block(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two block of at least ``floor``, at most ``cap``, no larger than needed for ``n``."""
    return max(floor, min(cap, triton.next_power_of_2(int(n))))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alive: torch.Tensor, seq: int,
           out: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None,
           blocks: tuple[int, ...] | None = None, index: torch.Tensor | None = None,
           gather_x: bool = False, gather_residual: bool = False, programs: int | None = None) -> torch.Tensor:
    """``out = x @ weight.T + bias`` (then exact GELU, or ``+ residual``) on the first ``alive * seq`` rows;
    ``x`` ``[M, K]``, ``weight`` ``[N, K]`` (an ``nn.Linear``'s), ``alive`` a one-element int32 device tensor.
    ``gather_x`` / ``gather_residual``: read those rows through ``index`` (where the alive sequences lie).
    ``blocks``: ``(BLOCK_M, BLOCK_N, BLOCK_K, warps[, stages])`` instead of the default tiles (a benchmark's
    sweep); ``programs``: at most this many programs, each looping over tiles (None: one per tile)."""
    rows, k = x.shape
    n = weight.shape[0]
    wide = x.dtype == torch.float32  # float32 tiles take twice the shared memory, and no tensor cores: smaller
    tile = 64 if wide else 128
    block_m, block_n, block_k = _block(rows, tile), _block(n, tile), _block(k, tile // 2)
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    stages = 2 if wide else 3
    if blocks is not None:
        block_m, block_n, block_k, warps = blocks[:4]
        stages = blocks[4] if len(blocks) > 4 else stages
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    grid = (tiles if programs is None else max(1, min(tiles, int(programs))),)
    _linear_kernel[grid](x, weight, bias, out if residual is None else residual, out, alive,
                         alive if index is None else index, seq, rows, n, k,
                         GELU=gelu, RESIDUAL=residual is not None, IEEE=x.dtype == torch.float32,
                         GATHER_X=gather_x and index is not None,
                         GATHER_RES=gather_residual and index is not None and residual is not None,
                         TILES_PER_PROGRAM=triton.cdiv(tiles, grid[0]), BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def attention(qkv: torch.Tensor, keys: torch.Tensor, alive: torch.Tensor, seq: int, heads: int,
              out: torch.Tensor, index: torch.Tensor | None = None, heads_per_program: int = 1) -> torch.Tensor:
    """Per head, softmax attention of each alive sequence's tokens over its real ones (``keys`` ``[M]``, 1 for a
    real token; read through ``index`` when given): ``qkv`` ``[M, 3 * width]`` (queries, keys, values), ``out``
    ``[M, width]``. ``heads_per_program`` (a divisor of ``heads``): heads one program runs in turn."""
    width = out.shape[1]
    head = width // heads
    if heads % heads_per_program:
        raise ValueError(f"heads_per_program must divide the {heads} heads, got {heads_per_program}.")
    sequences = qkv.shape[0] // seq
    block_m, block_n = _block(seq, 64), _block(seq, 64)
    grid = (triton.cdiv(seq, block_m), heads // heads_per_program, sequences)
    _attention_kernel[grid](qkv, keys, out, alive, alive if index is None else index, seq, width,
                            float(head) ** -0.5, IEEE=qkv.dtype == torch.float32, GATHER_KEYS=index is not None,
                            HEAD=head,
                            HEAD_PAD=_block(head, 256), BLOCK_M=block_m, BLOCK_N=block_n,
                            KEY_BLOCKS=triton.cdiv(seq, block_n), HEADS_PER_PROGRAM=heads_per_program, num_warps=4,
                            num_stages=2)
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, alive: torch.Tensor,
               seq: int, out: torch.Tensor, index: torch.Tensor | None = None, programs: int | None = None
               ) -> torch.Tensor:
    """LayerNorm over the last dimension of the first ``alive * seq`` rows of ``x`` ``[M, N]``, into ``out`` (its
    rows written through ``index`` when given); ``programs``: at most this many programs (None: one per block)."""
    rows, n = x.shape
    block_n = triton.next_power_of_2(n)
    block_rows = max(1, min(16, 8192 // block_n))
    blocks = triton.cdiv(rows, block_rows)
    grid = (blocks if programs is None else max(1, min(blocks, int(programs))),)
    _layer_norm_kernel[grid](x, weight, bias, out, alive, alive if index is None else index, seq, rows, n, float(eps),
                             SCATTER=index is not None, BLOCKS_PER_PROGRAM=triton.cdiv(blocks, grid[0]),
                             BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=4)
    return out
