"""Graph neural networks that read a graph (kdrun/data/graphs.py): their input is a batch
of node ids, their output each node's logits, computed from the node's neighbourhood.

Written in plain torch (``index_add_`` over an edge list) rather than with PyTorch
Geometric: two layer types need a few lines each, and a forward pass computes only what
its nodes need, the induced subgraph of their k-hop neighbourhood (k = the layers),
which is exact for those nodes and is the neighbour fetching GLNN times against an MLP
(a node's first-layer input comes from k hops away).

- ``gcn``: Kipf & Welling 2017, ``H' = D^-1/2 (A + I) D^-1/2 H W``.
- ``sage``: GraphSAGE with the mean aggregator (Hamilton et al. 2017),
  ``H' = H W_self + mean_{neighbours} H W_neighbours``, on every neighbour (no sampling).

In the inductive setting a node held out of the training graph is computed on the whole
graph (it arrives with its edges); every other node on the graph without the held-out
ones, as during training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.checks import number, positive_ints
from kdrun.models.base import MODELS


class GCNLayer(nn.Module):
    self_loops = True

    def __init__(self, width: int, out: int):
        super().__init__()
        self.linear = nn.Linear(width, out, bias=False)
        self.bias = nn.Parameter(torch.zeros(out))

    @staticmethod
    def edge_weights(src, dst, degree) -> torch.Tensor:
        return (degree[src] * degree[dst]).rsqrt()

    def forward(self, h, src, dst, weight):
        z = self.linear(h)
        return z.new_zeros(z.shape).index_add_(0, dst, z[src] * weight[:, None]) + self.bias


class SAGELayer(nn.Module):
    self_loops = False

    def __init__(self, width: int, out: int):
        super().__init__()
        self.self_linear = nn.Linear(width, out)
        self.neighbour_linear = nn.Linear(width, out, bias=False)

    @staticmethod
    def edge_weights(src, dst, degree) -> torch.Tensor:
        return 1.0 / degree[dst]

    def forward(self, h, src, dst, weight):
        mean = h.new_zeros(h.shape).index_add_(0, dst, h[src] * weight[:, None])
        return self.self_linear(h) + self.neighbour_linear(mean)


class GraphNet(nn.Module):
    """Layers of ``layer_type`` with ReLU and dropout between them, over ``graph``; the
    graph is held as buffers that are not saved with the weights (the data has it)."""

    reads_graph = True

    def __init__(self, graph, layer_type, widths: Sequence[int], num_classes: int,
                 dropout: float):
        super().__init__()
        self.nodes, self.dropout, self.layer_type = graph.num_nodes, dropout, layer_type
        self.register_buffer("node_features", graph.features.float(), persistent=False)
        sizes = [graph.features.shape[1], *widths, num_classes]
        self.layers = nn.ModuleList(layer_type(a, b) for a, b in zip(sizes, sizes[1:]))
        self.features = nn.Identity()  # the batch's last hidden layer: a feature-loss tap
        observed = None if graph.hidden is None else ~graph.hidden
        self._edges("whole", graph.edges, layer_type)
        if observed is not None:
            keep = observed[graph.edges[0]] & observed[graph.edges[1]]
            self._edges("observed", graph.edges[:, keep], layer_type)
            self.register_buffer("held_out", graph.hidden.clone(), persistent=False)
        else:
            self.held_out = None

    def _edges(self, name: str, edges, layer_type) -> None:
        src, dst = edges
        if layer_type.self_loops:
            loops = torch.arange(self.nodes)
            src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
        # each node's in-degree, exact in any float type: the edge weights are computed in
        # the model's own (float64 under trainer.float64), never rounded in another first
        degree = torch.bincount(dst, minlength=self.nodes).to(graph_dtype(self))
        for part, tensor in (("src", src), ("dst", dst), ("degree", degree)):
            self.register_buffer(f"{name}_{part}", tensor, persistent=False)

    def example_inputs(self, batch: int, device=None) -> torch.Tensor:
        """Node ids to time or probe with, drawn from a generator of their own."""
        g = torch.Generator().manual_seed(0)
        return torch.randint(self.nodes, (batch,), generator=g).to(device)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        nodes = nodes.reshape(-1).long()
        if self.held_out is None:
            return self._on(nodes, "whole")
        held = self.held_out[nodes]
        out = None
        for graph, rows in (("observed", ~held), ("whole", held)):
            if rows.any():
                part = self._on(nodes[rows], graph)
                out = part.new_empty(len(nodes), part.shape[1]) if out is None else out
                out[rows] = part
        return out

    def _on(self, nodes: torch.Tensor, graph: str) -> torch.Tensor:
        """The logits of ``nodes``, computed on the subgraph induced by their k-hop
        neighbourhood in ``graph`` (every node a layer of theirs reads, exactly)."""
        src, dst, degree = (getattr(self, f"{graph}_{p}") for p in ("src", "dst", "degree"))
        reached = torch.zeros(self.nodes, dtype=torch.bool, device=nodes.device)
        reached[nodes] = True
        for _ in self.layers:  # a layer reads one hop further
            reached[src[reached[dst]]] = True
        kept = reached.nonzero().squeeze(1)
        position = torch.full((self.nodes,), -1, dtype=torch.long, device=nodes.device)
        position[kept] = torch.arange(len(kept), device=nodes.device)
        inside = reached[src] & reached[dst]
        w = self.layer_type.edge_weights(src[inside], dst[inside], degree)
        s, d = position[src[inside]], position[dst[inside]]
        h = self.node_features[kept]
        for i, layer in enumerate(self.layers):
            if i:
                h = F.relu(h)
                if i == len(self.layers) - 1:
                    self.features(h[position[nodes]])
            h = layer(F.dropout(h, self.dropout, self.training), s, d, w)
        return h[position[nodes]]


def graph_dtype(model: nn.Module) -> torch.dtype:
    return model.node_features.dtype


GRAPH_RULES = {"hidden": positive_ints, "dropout": number(0, 1, hi_open=True)}


@MODELS.register("gcn", rules=GRAPH_RULES)
def gcn(input_shape, num_classes, hidden: Sequence[int] = (64,), dropout: float = 0.5,
        graph=None):
    """A graph convolutional network (Kipf & Welling 2017) with ``hidden`` widths."""
    return GraphNet(graph, GCNLayer, list(hidden), num_classes, dropout)


@MODELS.register("sage", rules=GRAPH_RULES)
def sage(input_shape, num_classes, hidden: Sequence[int] = (128,), dropout: float = 0.0,
         graph=None):
    """GraphSAGE with the mean aggregator (Hamilton et al. 2017) and ``hidden`` widths."""
    return GraphNet(graph, SAGELayer, list(hidden), num_classes, dropout)


gcn.reads_graph = sage.reads_graph = True
