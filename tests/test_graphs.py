"""Graph distillation (GNN -> MLP, GLNN): the GNNs against the dense formulas, the
settings, Planetoid's files written here in their format, and the pipeline end to end."""

from __future__ import annotations

import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch

from kdrun.data import load_data
from kdrun.data.graphs import Graph, csbm, undirected_edges
from kdrun.data.planetoid import load_planetoid
from kdrun.errors import ConfigError, DataError
from kdrun.models.graph import gcn, sage
from kdrun.run import pipeline
from tests.helpers import QUICK_LATENCY, make_config, run_then_rerun

# float64 on both sides: the subgraph's sums and the dense matrix product differ only in
# the order of additions, ~1e-16 relative on values of order 1; 1e-10 leaves 10^5 of margin
# and is 10^8 under what a missing edge or a wrong degree moves (~1e-2).
FLOAT64_BOUND = 1e-10


def small_graph(nodes=40, features=6, seed=0) -> Graph:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(nodes, (90,), generator=g)
    dst = torch.randint(nodes, (90,), generator=g)
    return Graph(torch.randn(nodes, features, generator=g, dtype=torch.float64),
                 undirected_edges(src, dst, nodes))


def dense_adjacency(graph: Graph, drop: torch.Tensor | None = None) -> torch.Tensor:
    a = torch.zeros(graph.num_nodes, graph.num_nodes, dtype=torch.float64)
    a[graph.edges[1], graph.edges[0]] = 1.0  # row: the node that receives
    if drop is not None:  # the nodes held out: none of their edges
        a[drop, :] = 0.0
        a[:, drop] = 0.0
    return a


def dense_gcn(model, graph, a) -> torch.Tensor:
    """Kipf & Welling's formula: relu(Â X W1 + b1) then Â H W2 + b2, Â = D^-1/2 (A+I) D^-1/2."""
    a = a + torch.eye(len(a), dtype=a.dtype)
    d = a.sum(1).rsqrt()
    norm = d[:, None] * a * d[None, :]
    h = model.node_features  # the graph's features as the model holds them
    for i, layer in enumerate(model.layers):
        h = torch.relu(h) if i else h
        h = norm @ (h @ layer.linear.weight.T) + layer.bias
    return h


def dense_sage(model, graph, a) -> torch.Tensor:
    """GraphSAGE-mean: H W_self + b + (mean over neighbours of H) W_neighbours."""
    mean = a / a.sum(1, keepdim=True).clamp_min(1)
    h = model.node_features
    for i, layer in enumerate(model.layers):
        h = torch.relu(h) if i else h
        h = layer.self_linear(h) + layer.neighbour_linear(mean @ h)
    return h


@pytest.mark.parametrize("build,formula", [(gcn, dense_gcn), (sage, dense_sage)])
def test_gnn_on_k_hop_subgraphs_equals_the_dense_formula(build, formula):
    graph = small_graph()
    torch.manual_seed(0)
    model = build((), 3, hidden=[5, 4], graph=graph).double().eval()
    expected = formula(model, graph, dense_adjacency(graph))
    for nodes in (torch.tensor([3]), torch.tensor([0, 17, 39, 17]), torch.arange(40)):
        out = model(nodes)
        assert out.dtype == torch.float64
        assert (out - expected[nodes]).abs().max() < FLOAT64_BOUND


def test_inductive_held_out_nodes_read_the_whole_graph_the_others_do_not():
    graph = small_graph()
    hidden = torch.zeros(40, dtype=torch.bool)
    hidden[[2, 5, 11, 30]] = True
    torch.manual_seed(0)
    model = gcn((), 3, hidden=[5], graph=Graph(graph.features, graph.edges, hidden))
    model = model.double().eval()
    whole = dense_gcn(model, graph, dense_adjacency(graph))
    observed = dense_gcn(model, graph, dense_adjacency(graph, drop=hidden))
    nodes = torch.tensor([2, 3, 5, 6, 30, 31])
    expected = torch.where(hidden[nodes][:, None], whole[nodes], observed[nodes])
    assert (model(nodes) - expected).abs().max() < FLOAT64_BOUND
    assert (whole[nodes] - observed[nodes]).abs().max() > 1e-3  # the two graphs differ there


def test_graph_buffers_are_not_saved_with_the_weights():
    model = gcn((), 3, hidden=[5], graph=small_graph())
    assert set(model.state_dict()) == {"layers.0.linear.weight", "layers.0.bias",
                                       "layers.1.linear.weight", "layers.1.bias"}


def test_csbm_splits_and_settings():
    raw = csbm(nodes=300, classes=3, features=8, val=50, test=100, labels_per_class=5)
    assert torch.bincount(raw.y_train).tolist() == [5, 5, 5]
    assert raw.graph is None and raw.pair.graph is not None  # features for the student
    # transductive: the students distil on every node but the labelled ones, the
    # validation and test nodes among them (their features, not their labels)
    ids = torch.cat([raw.pair.x_train, raw.pair.x_unlabeled])
    assert sorted(ids.tolist()) == list(range(300))
    assert set(raw.pair.x_val.tolist()) | set(raw.pair.x_test.tolist()) <= set(
        raw.pair.x_unlabeled.tolist())
    assert not set(raw.pair.x_val.tolist()) & set(raw.pair.x_test.tolist())
    assert torch.equal(raw.x_test, raw.pair.graph.features[raw.pair.x_test])
    inductive = csbm(nodes=300, classes=3, features=8, val=50, test=100, labels_per_class=5,
                     setting="inductive")
    held = inductive.pair.graph.hidden
    assert held.sum() == 100 and held[inductive.pair.x_test].all()
    assert not held[inductive.pair.x_unlabeled].any() and len(inductive.x_unlabeled) == 185


def test_graph_and_features_views_are_the_same_nodes_row_by_row():
    data = load_data(make_config("dataset=csbm", "dataset.nodes=300", "dataset.val=50",
                                 "dataset.test=100", "split.standardize=false").dataset,
                     make_config("split.standardize=false").split)
    graph = data.teacher_data.graph
    for split in (data.train, data.val, data.test, data.transfer):
        assert torch.equal(split.x, graph.features[split.other])
    assert torch.equal(data.teacher_data.train.x, data.train.other)
    assert (data.transfer.y == -100).all()
    assert data.transfer_labels is None  # no reference row trained on the test labels


# ---------------------------------------------------------------- Planetoid's files


def write_planetoid(root: Path, name: str = "toy", gap: bool = False) -> dict:
    """Planetoid's eight files for a graph of 30 nodes, 3 classes: 6 labelled (x, y), 20 in
    allx, 10 test nodes listed out of order in test.index (with ``gap``, one of the test
    range has no row, as CiteSeer's isolated nodes)."""
    rng = np.random.default_rng(0)
    features = rng.integers(0, 2, (31 if gap else 30, 7)).astype(np.float32)
    labels = rng.integers(0, 3, len(features))
    onehot = np.eye(3, dtype=np.int64)[labels]
    test_nodes = np.arange(20, len(features))
    if gap:
        test_nodes = np.delete(test_nodes, 4)  # node 24: in the range, not a test node
    listed = rng.permutation(test_nodes)
    sparse = scipy.sparse.csr_matrix
    parts = {"x": sparse(features[:6]), "y": onehot[:6], "allx": sparse(features[:20]),
             "ally": onehot[:20], "tx": sparse(features[listed]), "ty": onehot[listed]}
    graph = defaultdict(list)
    for a, b in [(0, 1), (1, 2), (2, 0), (3, 25), (20, 21), (5, 5), (7, 8), (8, 7)]:
        graph[a].append(b)
    parts["graph"] = graph
    for part, value in parts.items():
        with open(root / f"ind.{name}.{part}", "wb") as f:
            pickle.dump(value, f, protocol=2)
    (root / f"ind.{name}.test.index").write_text("\n".join(map(str, listed)) + "\n")
    return {"features": features, "labels": labels, "test": np.sort(test_nodes)}


@pytest.mark.parametrize("gap", [False, True])
def test_planetoid_files_are_read_with_the_public_split(tmp_path, gap):
    truth = write_planetoid(tmp_path, gap=gap)
    features, labels, edges, train, val, test = load_planetoid(tmp_path, "toy")
    rows = truth["test"]
    assert torch.equal(test, torch.from_numpy(rows))
    assert torch.equal(features[rows], torch.from_numpy(truth["features"][rows]))
    assert torch.equal(labels[rows], torch.from_numpy(truth["labels"][rows]))
    assert torch.equal(features[:20], torch.from_numpy(truth["features"][:20]))
    assert train.tolist() == list(range(6)) and val.tolist() == list(range(6, len(features)))
    pairs = set(map(tuple, edges.T.tolist()))
    assert pairs == {(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0), (3, 25), (25, 3),
                     (20, 21), (21, 20), (7, 8), (8, 7)}  # undirected, once, no self loop
    if gap:
        assert features[24].abs().sum() == 0  # the isolated node: zeros, as PyG reads it


def planetoid_error(tmp_path, damage) -> str:
    write_planetoid(tmp_path)
    damage(tmp_path)
    with pytest.raises(DataError) as error:
        load_planetoid(tmp_path, "toy")
    message = str(error.value)
    assert "\n" not in message
    return message


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("damage,words", [
    (lambda root: (root / "ind.toy.tx").unlink(), ["no file", "ind.toy.tx", "dataset.root"]),
    (lambda root: (root / "ind.toy.graph").write_bytes(b"not a pickle"),
     ["ind.toy.graph", "not a Planetoid file"]),
    (lambda root: (root / "ind.toy.y").write_bytes(pickle.dumps(Payload())),
     ["ind.toy.y", "refused to build builtins.print"]),
    (lambda root: (root / "ind.toy.test.index").write_text("3\nseven\n"),
     ["ind.toy.test.index", "one node id per line"]),
    (lambda root: (root / "ind.toy.test.index").write_text("20\n21\n"),
     ["10 test rows", "lists 2 nodes"]),
], ids=["missing", "not a pickle", "unsafe pickle", "bad index", "test rows disagree"])
def test_bad_or_missing_planetoid_files_are_one_line_each(tmp_path, damage, words):
    message = planetoid_error(tmp_path, damage)
    assert all(w in message for w in words), message


# ---------------------------------------------------------------- the pipeline

GRAPH = ["experiment=graph_csbm", "progress=false", "repeats=1", "num_threads=1",
         "trainer.epochs=40", "dataset.nodes=600", "dataset.val=100", "dataset.test=300",
         *QUICK_LATENCY]


def test_graph_pipeline_gnn_beats_mlp_names_views_and_reuses_every_stage(tmp_path):
    rows, result = run_then_rerun(tmp_path, *GRAPH)
    assert rows.loc["teacher", "arch"] == "gcn" and rows.loc["teacher", "view"] == "graph"
    assert rows.loc["scratch", "view"] == rows.loc["distilled", "view"] == "features"
    accuracy = rows.test_metric_best_val
    assert accuracy["teacher"] > accuracy["scratch"] + 10
    assert rows.loc["distilled", "train_unlabeled"] == 600 - 100
    assert "gcn on graph" in result["table"] and "mlp[128] on features" in result["table"]
    assert rows.loc["distilled", "latency_ms_b1"] > 0 and rows.loc["teacher", "latency_ms_b1"] > 0


def test_graph_models_need_their_view(tmp_path):
    with pytest.raises(ConfigError, match="only a graph network reads"):
        pipeline.run(make_config(*GRAPH, "teacher=mlp", f"cache.dir={tmp_path}/c"), tmp_path / "a")
    with pytest.raises(ConfigError, match="it reads a graph"):
        pipeline.run(make_config(*GRAPH, "dataset.teacher_view=features",
                                 f"cache.dir={tmp_path}/c"), tmp_path / "b")
    with pytest.raises(ConfigError, match="only scheme=offline"):
        pipeline.run(make_config(*GRAPH, "scheme=born_again", f"cache.dir={tmp_path}/c"),
                     tmp_path / "c")


def test_graph_sweep_trains_the_gnn_once_and_writes_the_report(tmp_path):
    from tests.test_sweep import kdrun

    kdrun(tmp_path, "-m", *GRAPH, "trainer.epochs=5", "loss.alpha=0.5,0.9",
          f"output_root={tmp_path}/out")
    sweep = next((tmp_path / "out" / "multirun").glob("*/*"))
    jobs = [d for d in sweep.iterdir() if d.is_dir()]
    assert len(jobs) == 2 and (sweep / "report.md").exists()
    summary = pd.read_csv(sweep / "summary.csv")
    teachers = summary.query("role == 'teacher'")
    # one cache entry each: the GNN and the scratch MLP trained once for both jobs
    assert teachers.cache_key.nunique() == 1 and teachers.reused.all()
    assert summary.query("role == 'scratch'").cache_key.nunique() == 1
    assert len(summary.query("role == 'distilled'")) == 2
