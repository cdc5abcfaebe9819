"""The fast path (`exitrl.runtime.fast_walk`). Everywhere: its buckets and its limits. On a CUDA machine: replayed CUDA
graphs give exactly what the same steps give run eagerly, on new data after capture, for policies captured with
their layer (graph-safe) and for those run eagerly after it (memory that changes shape, FREE's online threshold),
in fp32 and bf16, for every encoder family (every layer captured; an embedding whose model code copies host
tensors runs eagerly); and the fast path agrees with the eager walk. CI has no GPU: the CUDA
tests run on the lent H200 (README, "Inference speed"); the CPU runs the same code without graphs in
test_runtime.py and test_architectures.py."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from test_architectures import FAMILIES, tiny
from torch._inductor.utils import run_and_get_code

from exitrl.agents.calm import CalmPolicy
from exitrl.agents.confidence import ConfidencePolicy
from exitrl.agents.free import FreePolicy
from exitrl.agents.lte import LearnToExitPolicy
from exitrl.agents.patience import PatiencePolicy
from exitrl.agents.reinforce import ReinforcePolicy
from exitrl.agents.static import StaticPolicy
from exitrl.backbones import MultiExitModel
from exitrl.core.graphs import conditional_nodes
from exitrl.core.small_linear import FUSED_OUTPUTS, small_linear
from exitrl.evaluation.walk import walk
from exitrl.runtime.classifier import LiveSource
from exitrl.runtime.fast_walk import FastWalker, batch_buckets, tf32_matmuls, walk_buckets

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_batch_buckets_are_fine_above_16_and_end_at_the_batch_size():
    buckets = batch_buckets(256)
    assert buckets[:6] == [1, 2, 4, 8, 16, 32] and buckets[-1] == 256
    assert max(b - a for a, b in zip(buckets[4:], buckets[5:])) == 16
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20] and batch_buckets(1) == [1]


def test_walk_buckets_grow_by_at_most_half_and_end_at_the_window():
    assert walk_buckets(256) == [16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert walk_buckets(72) == [16, 24, 32, 48, 64, 72] and walk_buckets(8) == [8]
    assert walk_buckets(64, per_octave=4) == [16, 20, 24, 28, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError, match="per_octave"):
        walk_buckets(64, per_octave=0)


def test_a_batch_larger_than_the_walker_is_refused_and_an_empty_one_answers_nothing():
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64)
    walker = FastWalker(model, StaticPolicy(1), max_batch=8)
    with pytest.raises(ValueError, match="max_batch=8"):
        walker.run(ids, mask)
    assert walker.run(ids[:0], mask[:0]).layers.numel() == 0
    assert torch.equal(walker.run(ids[:5], mask[:5]).layers, torch.ones(5, dtype=torch.long))


def policies(model: MultiExitModel, threshold: float) -> dict:
    hidden, layers = model.hidden_size, model.num_layers
    torch.manual_seed(1)
    return {"static": StaticPolicy(2), "confidence": ConfidencePolicy(threshold), "patience": PatiencePolicy(1),
            "reinforce": ReinforcePolicy(layers, hidden, 2, hidden=16), "lte": LearnToExitPolicy(hidden, 0.5),
            "reinforce_history": ReinforcePolicy(layers, hidden, 2, hidden=16, features="history"),  # walk memory
            "calm_margin": CalmPolicy("margin", 2 * threshold - 1),
            "calm_saturation": CalmPolicy("saturation", 0.9),  # memory changes shape: eager after the layer
            "free_fixed": FreePolicy(1, threshold, adaptive=False),
            "free_adaptive": FreePolicy(1, threshold, refit_every=8)}  # refits between batches: eager


def pipelined_equals_one_at_a_time(device: torch.device, graphs: bool) -> set:
    """Several batches in flight (3 lanes), and windows of several batches walked together in launches of at most
    ``max_batch`` rows (2 lanes of 72-row windows, split where the sequence bucket changes; and the same with each
    alive count read a layer late), answer exactly what one batch at a time does, and what the trace walk does on
    the live backbone, for every agent and rule; returns which policies exited rows at several layers."""
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    model = model.to(device)
    with torch.no_grad():
        first = model(ids.to(device), mask.to(device)).logits[:, 0].float()
    threshold = float(torch.softmax(first, -1).max(-1).values.median())
    batches = [(ids[i:i + n], mask[i:i + n]) for i, n in ((0, 8), (8, 5), (13, 11), (2, 1), (4, 16), (0, 24))]
    batches.insert(4, (ids[3:9, :7], mask[3:9, :7]))  # a shorter sequence bucket: a window of its own,
    batches.insert(6, (ids[10:14, :7], mask[10:14, :7]))  # which takes this later batch too, out of order
    mixed = set()
    for name, policy in policies(model, threshold).items():
        one = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=24, graphs=graphs, token_types=False,
                         lanes=1)
        many = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=24, graphs=graphs, token_types=False,
                          lanes=3)
        windowed = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=24, graphs=graphs,
                              token_types=False, lanes=2, window=72, seq_multiple=4)
        late = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=24, graphs=graphs, token_types=False,
                          lanes=2, window=72, seq_multiple=4, late_reads=True)  # alive counts read a layer late
        on_device = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=24,
                               graphs=graphs and conditional_nodes(),  # an older torch: the host reads each choice
                               token_types=False, lanes=2, window=72, seq_multiple=4, device_walk="buckets")
        counted = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=24, graphs=graphs,
                             token_types=False, lanes=2, window=72, seq_multiple=4, device_walk="counted")
        reference = copy.deepcopy(policy).to(device)
        for _ in range(2):  # the second pass replays every graph
            expected = [one.run(i, m) for i, m in batches]
            got = list(many.run_batches(iter(batches)))
            together = list(windowed.run_batches(iter(batches)))
            lagging = list(late.run_batches(iter(batches)))
            chosen = list(on_device.run_batches(iter(batches)))  # launches chosen on the device
            following = list(counted.run_batches(iter(batches)))  # kernels that skip rows past the alive count
            assert len(got) == len(together) == len(lagging) == len(chosen) == len(following) == len(batches)
            for c, f in zip(together, following):
                if counted.counted is None:  # the CPU without Triton's interpreter: the eager layers, exit for exit
                    assert torch.equal(c.layers, f.layers) and torch.allclose(c.logits, f.logits, atol=1e-5), name
                else:  # Triton's kernels: the same arithmetic up to rounding (a row at a threshold may flip)
                    same = c.layers == f.layers
                    assert float(same.float().mean()) >= 0.9, name
                    assert torch.allclose(c.logits[same], f.logits[same], atol=1e-3), name
            for (batch_ids, batch_mask), a, b, c, d, e in zip(batches, expected, got, together, lagging, chosen):
                assert torch.equal(a.layers, c.layers) and torch.equal(a.predictions, c.predictions), name
                assert torch.allclose(a.logits, c.logits, atol=1e-5), name
                assert torch.equal(c.layers, d.layers) and torch.allclose(c.logits, d.logits, atol=1e-5), name
                assert torch.equal(c.layers, e.layers) and torch.allclose(c.logits, e.logits, atol=1e-5), name
                assert torch.equal(a.layers, b.layers) and torch.equal(a.predictions, b.predictions), name
                assert torch.equal(a.logits, b.logits), name
                with torch.no_grad():
                    walked = walk(reference, LiveSource(model, batch_ids.to(device), batch_mask.to(device)),
                                  len(batch_ids), device)
                if device.type == "cpu":  # the same arithmetic: exit for exit
                    assert torch.equal(walked.layers.cpu(), b.layers), name
                mixed.add((name, len(set(b.layers.tolist())) > 1))
        in_flight = len(many.lanes)
        assert in_flight == (1 if policy.observes_final or not policy.graph_safe else 3), name
        launched = {key[0] for lane in windowed.lanes for w in lane.windows.values() for key in w.steps}
        buckets = {seq for lane in windowed.lanes for seq in lane.windows}
        assert buckets == {8, 12} and "layer" in launched, name  # two sequence buckets; layers split in launches
        grouped = [indices for indices, _ in windowed._windows(batches)]
        if not policy.observes_final:
            assert grouped == [[0, 1, 2], [3, 5, 7], [4, 6]], name  # 3 batches at most; the short ones at the end
        assert windowed.window == (24 if policy.observes_final else 72), name  # learning between batches: one
        walked_on_device = {key[0] for lane in on_device.lanes for w in lane.windows.values() for key in w.steps}
        if policy.graph_safe:  # one step a window; a policy the device cannot run walks as without the option
            assert walked_on_device == {"walk"}, name
        else:
            assert "walk" not in walked_on_device and "layer" in walked_on_device, name
    return mixed


def test_batches_in_flight_answer_what_one_batch_at_a_time_and_the_trace_walk_do():
    mixed = pipelined_equals_one_at_a_time(torch.device("cpu"), graphs=False)
    assert ("confidence", True) in mixed and ("patience", True) in mixed


@CUDA
def test_batches_in_flight_on_cuda_graphs_answer_what_one_batch_at_a_time_does():
    assert ("confidence", True) in pipelined_equals_one_at_a_time(torch.device("cuda"), graphs=True)


def test_warm_up_makes_every_step_a_one_launch_walk_needs_before_the_first_batch():
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    with torch.no_grad():
        first = model(ids, mask).logits[:, 0].float()
    threshold = float(torch.softmax(first, -1).max(-1).values.median())
    warmed = FastWalker(model, ConfidencePolicy(threshold), max_batch=8, token_types=False, lanes=2)
    made = warmed.warm_up(max_length=ids.shape[1])  # 11 tokens: one sequence bucket of 16
    assert made == 2 * len(warmed.buckets) * (1 + 3 + 1)  # lanes x sizes x (embedding, 3 layers, compaction)
    steps = {key for lane in warmed.lanes for w in lane.windows.values() for key in w.steps}
    batches = [(ids[i:i + n], mask[i:i + n]) for i, n in ((0, 8), (8, 3), (11, 8), (19, 5))]
    got = list(warmed.run_batches(batches))
    assert {key for lane in warmed.lanes for w in lane.windows.values() for key in w.steps} == steps  # none new
    fresh = FastWalker(model, ConfidencePolicy(threshold), max_batch=8, token_types=False, lanes=2)
    for a, b in zip(got, fresh.run_batches(batches)):  # warming changed no answer
        assert torch.equal(a.layers, b.layers) and torch.equal(a.logits, b.logits)
    assert len({int(layer) for a in got for layer in a.layers}) > 1
    # the device walk: one step per lane and walk size, each the whole walk of a window that size
    on_device = FastWalker(model, ConfidencePolicy(threshold), max_batch=32, token_types=False, lanes=2,
                           device_walk=True)
    assert on_device.warm_up(max_length=ids.shape[1]) == 2 * len(on_device.walk_buckets) == 2 * 3  # 16, 24, 32
    steps = {key for lane in on_device.lanes for w in lane.windows.values() for key in w.steps}
    assert steps == {("walk", 16), ("walk", 24), ("walk", 32)}
    for a, b in zip(got, on_device.run_batches(batches)):
        assert torch.equal(a.layers, b.layers) and torch.allclose(a.logits, b.logits, atol=1e-6)
    assert {key for lane in on_device.lanes for w in lane.windows.values() for key in w.steps} == steps


def test_windows_gather_a_buckets_batches_out_of_order_but_hold_back_at_most_a_window_of_rows():
    """Batches of four sequence buckets (20 rows each, windows of at most 72 rows): past 72 rows waiting in open
    windows, or two windows' worth of later batches, the oldest is walked; the rest close with the input, a
    bucket's batches together."""
    model, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    walker = FastWalker(model, StaticPolicy(2), max_batch=24, graphs=False, token_types=False, window=72,
                        seq_multiple=4)
    batches = [(torch.ones(20, length, dtype=torch.long),) for length in (3, 7, 11, 15, 3, 7, 3)]
    assert [indices for indices, _ in walker._windows(batches)] == [[0], [1], [2], [3], [4, 6], [5]]
    # a short batch among full ones of another bucket waits at most two windows' worth of batches (3 each here),
    # not for the end of the input
    handed = []

    def stream():
        for index in range(40):
            handed.append(index)
            yield (torch.ones(20 if index == 0 else 24, 3 if index == 0 else 11, dtype=torch.long),)

    first_window = next(indices for indices, _ in walker._windows(stream()) if 0 in indices)
    assert first_window == [0] and len(handed) <= 7


def test_compaction_puts_the_alive_rows_first_in_order_with_everything_that_follows_a_row():
    model, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    walker = FastWalker(model, PatiencePolicy(1), max_batch=16, graphs=False, token_types=False)
    window = walker.lanes[0].window(8)
    rows = window.rows(0, 16)
    torch.manual_seed(0)
    for alive in (torch.rand(16) < 0.4, torch.ones(16, dtype=torch.bool), torch.zeros(16, dtype=torch.bool)):
        rows.alive.copy_(alive)
        rows.hidden.copy_(torch.randn(rows.hidden.shape))
        rows.position.copy_(torch.arange(16.0))
        for value in rows.memory.values():
            value.copy_(torch.arange(16).view(-1, *[1] * (value.dim() - 1)).expand_as(value))
        hidden = rows.hidden.clone()
        rows.compact()
        order = torch.cat([torch.nonzero(alive).squeeze(1), torch.nonzero(~alive).squeeze(1)])  # stable
        assert torch.equal(rows.position, order.float()) and torch.equal(rows.hidden, hidden[order])
        assert torch.equal(rows.alive, alive[order]) and int(rows.alive.sum()) == int(alive.sum())
        for value in rows.memory.values():
            assert torch.equal(value.reshape(16, -1)[:, 0].long(), order)


def test_late_reads_leave_out_the_first_deciding_layers_read_and_stop_a_layer_later():
    """A walk reads each deciding layer's alive count; with ``late_reads`` it reads the one before while the next
    layer is queued: one read fewer, the last layer read at once. A walk everyone leaves at layer 1 stops after
    queueing layer 2 (one wasted layer), answering the same."""
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)

    def reads(policy, late: bool) -> tuple[int, object]:
        walker = FastWalker(model, policy, max_batch=16, graphs=False, token_types=False, late_reads=late)
        walk_one, count = walker._walk(walker.lanes[0], [(ids[:8], mask[:8])]), 0
        try:
            while True:
                walk_one.send(None)
                count += 1
        except StopIteration as finished:
            return count, finished.value[0][0]

    for policy, plain, lagging in ((ConfidencePolicy(1.0), 4, 3), (ConfidencePolicy(0.0), 1, 1)):
        (a, exits_a), (b, exits_b) = reads(policy, False), reads(policy, True)
        assert (a, b) == (plain, lagging)
        assert torch.equal(exits_a.layers, exits_b.layers) and torch.equal(exits_a.logits, exits_b.logits)


def test_lanes_windows_and_batch_sizes_must_be_positive_and_a_window_is_whole_batches():
    model, _, _ = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    for options, message in (({"lanes": 0}, "lanes must be >= 1"), ({"window": 0}, "window must be >= 1 row"),
                             ({"max_batch": 0}, "max_batch must be >= 1")):
        with pytest.raises(ValueError, match=message):
            FastWalker(model, StaticPolicy(1), **options)
    assert FastWalker(model, StaticPolicy(1), max_batch=32, window=100).window == 128  # rounded up to batches
    assert FastWalker(model, StaticPolicy(1), max_batch=32).window == 32  # default: one batch


def test_tf32_is_set_for_a_step_on_cuda_beside_a_half_backbone_only_and_always_put_back():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_matmuls(torch.device("cuda")):  # the flag needs no GPU to be set
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError), tf32_matmuls(torch.device("cuda")):
        raise RuntimeError("a step that fails")
    assert matmul.fp32_precision == before
    for device in (torch.device("cpu"), None):
        with tf32_matmuls(device):
            assert matmul.fp32_precision == before
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    assert not FastWalker(model, StaticPolicy(1)).tf32  # a float32 backbone keeps float32 products
    assert FastWalker(model.to(torch.bfloat16), StaticPolicy(1)).tf32
    assert not FastWalker(model, StaticPolicy(1), tf32=False).tf32
    # the decisions, and only they, run under it (the flag can be set without a GPU, so the walk is pointed at it)
    seen: dict[str, set] = {"decision": set(), "layer": set()}

    class Recording(ConfidencePolicy):
        def decide(self, batch, memory):
            seen["decision"].add(matmul.fp32_precision)
            return super().decide(batch, memory)

    hook = model.layers[0].register_forward_pre_hook(lambda *_: seen["layer"].add(matmul.fp32_precision))
    try:
        for graph_safe in (True, False):
            policy = Recording(0.5)
            policy.graph_safe = graph_safe  # the captured decision and the eager one
            walker = FastWalker(model, policy, max_batch=8, graphs=False, token_types=False)
            walker.tf32_device = torch.device("cuda")
            walker.run(ids[:8], mask[:8])
            assert seen == {"decision": {"tf32"}, "layer": {before}}, graph_safe
            assert matmul.fp32_precision == before
    finally:
        hook.remove()


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["bert", *sorted(FAMILIES)])
def test_cuda_graphs_equal_the_same_steps_run_eagerly(family, dtype):
    options = FAMILIES.get(family, dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=64))
    model, ids, mask = tiny(family, **options)
    device = torch.device("cuda")
    model = model.to(device, dtype)
    with torch.no_grad():
        first = model(ids.to(device), mask.to(device)).logits[:, 0].float()
    threshold = float(torch.softmax(first, -1).max(-1).values.median())
    batches = [(ids, mask), (ids[4:].flip(0), mask[4:].flip(0)), (ids[:3], mask[:3])]  # new data after capture
    mixed = set()
    for name, policy in policies(model, threshold).items():
        graphed = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=32, token_types=False)
        eager = FastWalker(model, copy.deepcopy(policy).to(device), max_batch=32, graphs=False, token_types=False)
        reference = copy.deepcopy(policy).to(device)
        for batch_ids, batch_mask in batches * 2:  # the second pass replays every graph
            a = graphed.run(batch_ids, batch_mask)
            b = eager.run(batch_ids.to(device), batch_mask.to(device))  # device inputs: the other staging
            assert torch.equal(a.layers, b.layers), (family, name)
            assert torch.equal(a.predictions, b.predictions) and torch.equal(a.logits, b.logits), (family, name)
            with torch.no_grad():
                walked = walk(reference, LiveSource(model, batch_ids.to(device), batch_mask.to(device)),
                              len(batch_ids), device)
            agree = float((walked.layers.cpu() == a.layers).float().mean())
            assert agree >= (0.95 if dtype == torch.float32 else 0.8), (family, name, agree)  # padded shapes
            mixed.add((name, len(set(a.layers.tolist())) > 1))
        layers = [step for lane in graphed.lanes for w in lane.windows.values() for key, step in w.steps.items()
                  if key[0] != "embed"]  # layers, decisions, compactions
        assert layers and all(step.graph is not None for step in layers), (family, name)  # the embedding may not
    assert ("confidence", True) in mixed  # rows left at different layers: the buckets moved rows


@pytest.mark.xdist_group("inductor")  # one worker pays torch.compile's first-use cost on the CPU once
def test_a_small_linear_is_a_multiply_and_sum_under_compile_and_equals_the_linear():
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    for outputs, bias in ((2, True),):  # an exit head over two labels
        linear = torch.nn.Linear(32, outputs, bias=bias)
        assert torch.equal(small_linear(x, linear), linear(x))  # eagerly: the linear itself
        compiled = torch.compile(lambda t, lin=linear: small_linear(t, lin), dynamic=False)
        out, code = run_and_get_code(compiled, x)
        assert torch.allclose(out, linear(x), atol=1e-5), outputs
        assert not re.search(r"extern_kernels\.(add)?mm", "".join(code)), outputs  # fused: no matrix product call
    wide = torch.nn.Linear(32, FUSED_OUTPUTS + 1)
    assert torch.equal(small_linear(x, wide), wide(x))


@pytest.mark.xdist_group("inductor")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_compiled_decisions_agree_with_the_eager_steps(device):
    """torch.compile'd exit heads and decisions (in CUDA graphs on a GPU; C++ kernels on the CPU), with the small
    heads and the alive count fused in, and for one policy compiled layers too, answer what the eager steps
    answer."""
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    device = torch.device(device)
    model = model.to(device)
    with torch.no_grad():
        first = model(ids.to(device), mask.to(device)).logits[:, 0].float()
    threshold = float(torch.softmax(first, -1).max(-1).values.median())
    chosen = [ConfidencePolicy(threshold), ReinforcePolicy(3, 32, 2, hidden=16)]  # a rule, and an MLP's small heads
    if device.type == "cuda":
        chosen.append(PatiencePolicy(1))  # memory kept between layers (on the CPU, compiling costs CI seconds)
    for policy in chosen:
        policy.to(device)
        # the rule's walker compiles the layers too (`compile_layers`): the full model's steps fused the same way
        compiled = FastWalker(model, policy, max_batch=32, token_types=False, compile_decisions=True,
                              graphs=device.type == "cuda", compile_layers=isinstance(policy, ConfidencePolicy))
        eager = FastWalker(model, policy, max_batch=32, graphs=False, token_types=False)
        for batch_ids, batch_mask in [(ids, mask), (ids[4:].flip(0), mask[4:].flip(0))] * 2:
            a, b = compiled.run(batch_ids, batch_mask), eager.run(batch_ids, batch_mask)
            assert float((a.layers == b.layers).float().mean()) >= 0.95, type(policy).__name__
            same = a.layers == b.layers
            assert torch.allclose(a.logits[same], b.logits[same], atol=1e-4)


@CUDA
@pytest.mark.parametrize("mode", ["counted", "buckets"])
def test_the_device_walk_is_one_captured_graph_or_a_clear_error_on_a_torch_without_conditional_nodes(mode):
    model, ids, mask = tiny("bert", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    model = model.cuda()
    if mode == "buckets" and not conditional_nodes():
        with pytest.raises(ValueError, match=f"torch {re.escape(torch.__version__)} .*cannot"):
            FastWalker(model, ConfidencePolicy(0.6), max_batch=32, token_types=False, device_walk=mode)
        return
    with torch.no_grad():
        first = model(ids.cuda(), mask.cuda()).logits[:, 0].float()
    threshold = float(torch.softmax(first, -1).max(-1).values.median())
    walker = FastWalker(model, ConfidencePolicy(threshold), max_batch=32, token_types=False, device_walk=mode)
    eager = FastWalker(model, ConfidencePolicy(threshold), max_batch=32, graphs=False, token_types=False)
    assert walker.device_walk == mode and (walker.counted is not None) == (mode == "counted")
    # after capture, rows in other orders and numbers: the alive counts land in buckets the first run never took
    batches = [(ids, mask), (ids.flip(0), mask.flip(0)), (ids[5:], mask[5:]), (ids[:17], mask[:17])]
    layers = set()
    for batch_ids, batch_mask in batches * 2:  # the second pass replays every graph
        a, b = walker.run(batch_ids, batch_mask), eager.run(batch_ids.cuda(), batch_mask.cuda())
        if mode == "buckets":  # the same kernels
            assert torch.equal(a.layers, b.layers) and torch.allclose(a.logits, b.logits, atol=1e-5)
        else:  # Triton's kernels in float32: the same up to rounding
            same = a.layers == b.layers
            assert float(same.float().mean()) >= 0.9 and torch.allclose(a.logits[same], b.logits[same], atol=1e-3)
        layers.update(a.layers.tolist())
    assert len(layers) > 1  # rows left at several layers: the device chose several launch sizes
    steps = [step for lane in walker.lanes for w in lane.windows.values() for step in w.steps.values()]
    assert steps and all(step.graph is not None for step in steps)
