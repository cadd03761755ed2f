"""Node classification on a graph: a GNN teacher reads the graph (a node's id, whose
neighbourhood it aggregates: kdrun/models/graph.py), an MLP student reads only the node's
features (Zhang et al. 2022, "Graph-less Neural Networks", GLNN). Two views of each node
(kdrun/data/views.py): ``graph`` (node ids) and ``features``.

Settings (GLNN §4): ``transductive``, the students distil on every node but the labelled
training ones (validation and test nodes included: their features, never their labels);
``inductive``, the test nodes are held out: their edges are not in the graph the models
train on or the teacher's targets are computed on, and they are no distillation input;
at test time the GNN aggregates a held-out node's neighbourhood in the whole graph.

``csbm`` is the offline default: a contextual stochastic block model (Deshpande et al.
2018) whose features and edges both carry the class, so a GNN beats an MLP on it.
Planetoid's files (Cora, CiteSeer, PubMed): kdrun/data/planetoid.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdrun.checks import number, one_of
from kdrun.data.base import DATASETS, SEED
from kdrun.data.raw import RawData
from kdrun.data.views import paired
from kdrun.errors import DataError

SETTING = one_of("transductive", "inductive")
VIEWS = one_of("graph", "features")


@dataclass
class Graph:
    """Node features (nodes, features) and undirected edges, each stored in both
    directions without self loops, (2, edges); ``hidden`` marks the nodes held out of the
    graph the models train on (the inductive setting), None when none is."""

    features: torch.Tensor
    edges: torch.Tensor
    hidden: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.features)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What defines the graph's content (hashed into its data's fingerprint)."""
        return (self.features, self.edges) + (() if self.hidden is None else (self.hidden,))


def undirected_edges(src: torch.Tensor, dst: torch.Tensor, nodes: int) -> torch.Tensor:
    """(2, E): each pair once per direction, self loops and repeats dropped, sorted."""
    keep = src != dst
    src, dst = src[keep], dst[keep]
    both = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    codes = torch.unique(both[0] * nodes + both[1])
    return torch.stack([codes // nodes, codes % nodes])


def graph_views(graph: Graph, labels: torch.Tensor, num_classes: int, train, val, test,
                setting: str, teacher_view: str, student_view: str, dataset: str) -> RawData:
    """The nodes ``train`` (labelled), ``val`` and ``test`` as paired views, and every
    other node the ``setting`` allows as the students' unlabelled transfer set."""
    nodes = graph.num_nodes
    if setting == "inductive":
        hidden = torch.zeros(nodes, dtype=torch.bool)
        hidden[test] = True
        graph = Graph(graph.features, graph.edges, hidden)
    elsewhere = torch.ones(nodes, dtype=torch.bool)
    elsewhere[train] = False
    if graph.hidden is not None:
        elsewhere &= ~graph.hidden
    rest = elsewhere.nonzero().squeeze(1)
    ids = torch.arange(nodes)

    def view(inputs: torch.Tensor, with_graph: bool) -> RawData:
        return RawData(inputs[train], labels[train], inputs[test], labels[test], num_classes,
                       x_unlabeled=inputs[rest], x_val=inputs[val], y_val=labels[val],
                       graph=graph if with_graph else None)

    views = {"graph": view(ids, True), "features": view(graph.features, False)}
    return paired(views, teacher_view, student_view, dataset)


def public_split(labels: torch.Tensor, num_classes: int, per_class: int, val: int, test: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planetoid's recipe (Yang et al. 2016) for a graph without its own split:
    ``per_class`` labelled nodes of each class, then ``val`` and ``test`` nodes, each
    drawn at random with ``seed`` from the nodes left."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train = torch.cat([order[labels[order] == c][:per_class] for c in range(num_classes)])
    left = order[~torch.isin(order, train)]
    if len(left) < val + test:
        raise DataError(f"the graph has {len(labels)} nodes: too few for {len(train)} "
                        f"training, {val} validation and {test} test nodes")
    return torch.sort(train).values, left[:val], left[val:val + test]


@DATASETS.register("csbm", rules={
    "nodes": number(10, integer=True), "classes": number(2, integer=True),
    "features": number(1, integer=True), "degree": number(0, lo_open=True),
    "homophily": number(0, 1), "signal": number(0), "labels_per_class": number(1, integer=True),
    "val": number(0, integer=True), "test": number(1, integer=True), "seed": SEED,
    "setting": SETTING, "teacher_view": VIEWS, "student_view": VIEWS})
def csbm(nodes: int = 2000, classes: int = 5, features: int = 100, degree: float = 8.0,
         homophily: float = 0.8, signal: float = 2.0, labels_per_class: int = 20,
         val: int = 500, test: int = 1000, seed: int = 0, setting: str = "transductive",
         teacher_view: str = "graph", student_view: str = "features") -> RawData:
    """A contextual stochastic block model: each node's class drawn uniformly; its
    features the class's mean (a random direction of length ``signal``) plus standard
    normal noise; ``nodes * degree / 2`` edges, each from a random node to a node of
    its class with probability ``homophily``, else of another class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (nodes,), generator=g)
    means = torch.randn(classes, features, generator=g)
    means = signal * means / means.norm(dim=1, keepdim=True)
    x = means[labels] + torch.randn(nodes, features, generator=g)
    src = torch.randint(nodes, (round(nodes * degree / 2),), generator=g)
    same = torch.rand(len(src), generator=g) < homophily
    wanted = torch.where(same, labels[src],
                         (labels[src] + torch.randint(1, classes, (len(src),), generator=g))
                         % classes)
    members = [torch.nonzero(labels == c).squeeze(1) for c in range(classes)]
    dst = torch.empty_like(src)
    for c in range(classes):  # a random member of each edge's wanted class
        at = wanted == c
        pick = torch.randint(len(members[c]), (int(at.sum()),), generator=g)
        dst[at] = members[c][pick]
    graph = Graph(x, undirected_edges(src, dst, nodes))
    train, val_nodes, test_nodes = public_split(labels, classes, labels_per_class, val, test,
                                                seed)
    return graph_views(graph, labels, classes, train, val_nodes, test_nodes, setting,
                       teacher_view, student_view, "csbm")
