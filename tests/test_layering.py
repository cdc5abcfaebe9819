"""The package's import graph has no cycles, and no module imports a module of a higher layer. The folders are the
layers: each subpackage of ``src/exitrl`` is one entry below, and the top-level modules are the contracts users code
against (rewards, policies) and the entry points (the API and the CLIs)."""

from __future__ import annotations

from import_graph import SRC, cycles, import_graph, layer_of, upward_imports

LAYERS = [
    ("exitrl.core",),                                       # infrastructure: options, devices, hashing, checkpoints
    ("exitrl.data",),                                       # tasks and text
    ("exitrl.backbones",),                                  # multi-exit encoders and causal LMs, training recipes
    ("exitrl.traces", "exitrl.rewards", "exitrl.policy"),   # cached per-layer outputs; the reward and policy contracts
    ("exitrl.envs", "exitrl.evaluation", "exitrl.calibration"),  # RL envs over traces; the walk and the metric contract
    ("exitrl.agents",),                                     # learned agents and fixed rules, one file each
    ("exitrl.experiments",),                                # a run: pipeline, record, run folder, co-training
    ("exitrl.runtime", "exitrl.decoding"),                  # real early exits: classification and generation
    ("exitrl.serving",),                                    # exitrl serve's parts: requests, metrics, LitServe API
    ("exitrl.cli",),                                        # what every CLI shares
    ("exitrl.train", "exitrl.compare", "exitrl.api", "exitrl.export", "exitrl.predict", "exitrl.generate",
     "exitrl.sweep_points", "exitrl.serve"),
    ("exitrl.sweep",),
    ("exitrl.command", "exitrl.__main__"),                  # the `exitrl` console script, python -m exitrl
]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_upward_imports_and_every_module_has_a_layer():
    graph = import_graph()
    assert [m for m in graph if m != "exitrl" and layer_of(m, LAYERS) is None] == []
    assert upward_imports(graph, LAYERS) == []


def test_every_subpackage_is_one_layer():
    folders = sorted(f"exitrl.{p.name}" for p in (SRC / "exitrl").iterdir() if (p / "__init__.py").is_file())
    named = sorted(prefix for layer in LAYERS for prefix in layer if prefix.count(".") == 1)
    assert [f for f in folders if f not in named] == []
    assert [prefix for layer in LAYERS for prefix in layer if prefix.count(".") > 1] == []


def test_the_checker_sees_cycles_and_upward_imports(tmp_path):
    package = tmp_path / "exitrl"
    for folder in (package, package / "traces", package / "evaluation"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (package / "traces" / "trace.py").write_text("from exitrl.evaluation.evaluate import x\n")
    (package / "evaluation" / "evaluate.py").write_text("def f():\n    from exitrl.traces import trace\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["exitrl.evaluation.evaluate", "exitrl.traces.trace"]]
    assert upward_imports(graph, LAYERS) == [("exitrl.traces.trace", "exitrl.evaluation.evaluate")]
