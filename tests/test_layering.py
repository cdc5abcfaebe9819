"""The package's import graph has no cycles, and no module imports a module of a higher layer (data, backbones,
traces and rewards below envs and policies, below evaluation, below agents, below the pipeline, below the CLIs)."""

from __future__ import annotations

from import_graph import cycles, import_graph, layer_of, upward_imports

LAYERS = [
    ("exitrl.options", "exitrl.device", "exitrl.hashing", "exitrl.splits", "exitrl.metrics", "exitrl.observation",
     "exitrl.report", "exitrl.progress", "exitrl.checkpoint", "exitrl.graphs", "exitrl.distributed"),
    ("exitrl.data",),
    ("exitrl.backbones",),
    ("exitrl.trace", "exitrl.rewards"),
    ("exitrl.tracing", "exitrl.token_tracing", "exitrl.lm_traces", "exitrl.envs", "exitrl.policy"),
    ("exitrl.tradeoff", "exitrl.walk", "exitrl.crossfit", "exitrl.protocol"),
    ("exitrl.fast_walk",),
    ("exitrl.evaluate", "exitrl.calibration", "exitrl.run_summary"),
    ("exitrl.agents",),
    ("exitrl.record", "exitrl.cotraining", "exitrl.runs", "exitrl.runtime", "exitrl.decoding"),
    ("exitrl.pipeline",),
    ("exitrl.cli",),
    ("exitrl.train", "exitrl.compare", "exitrl.api", "exitrl.export", "exitrl.predict", "exitrl.generate",
     "exitrl.sweep_points"),
    ("exitrl.sweep",),
]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_upward_imports_and_every_module_has_a_layer():
    graph = import_graph()
    assert [m for m in graph if m != "exitrl" and layer_of(m, LAYERS) is None] == []
    assert upward_imports(graph, LAYERS) == []


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    package = tmp_path / "exitrl"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "trace.py").write_text("from exitrl.evaluate import x\n")
    (package / "evaluate.py").write_text("def f():\n    from exitrl import trace\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["exitrl.evaluate", "exitrl.trace"]]
    assert upward_imports(graph, LAYERS) == [("exitrl.trace", "exitrl.evaluate")]
