"""Planetoid's citation graphs (Cora, CiteSeer, PubMed; Yang et al. 2016) as their files
are shipped (e.g. with Kipf & Welling's gcn repository): ``ind.<name>.x``, ``.y``,
``.tx``, ``.ty``, ``.allx``, ``.ally``, ``.graph`` (Python pickles of scipy matrices,
numpy arrays and a dict of neighbour lists) and ``ind.<name>.test.index`` (text), read
from ``dataset.root``, never downloaded. The public split: the nodes of ``x`` labelled
(20 per class), the next 500 validation, the nodes ``test.index`` lists test, as every
paper since Kipf & Welling 2017 reads them. The pickles are read by an unpickler that
builds only those types: a file that asks for anything else is refused, not run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from kdrun.checks import boolean, one_of
from kdrun.data.base import DATASETS
from kdrun.data.graphs import SETTING, VIEWS, Graph, graph_views, undirected_edges
from kdrun.errors import DataError

PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")
VALIDATION_NODES = 500  # the public split's


# what else the files' pickles (Python 2's, or Python 3's at protocol 2) name
SAFE = {("collections", "defaultdict"), ("__builtin__", "list"), ("builtins", "list"),
        ("_codecs", "encode")}


class _PlanetoidUnpickler(pickle.Unpickler):
    """Builds scipy's CSR matrices, numpy arrays and dicts of lists, nothing else."""

    def find_class(self, module: str, name: str):
        import scipy.sparse

        if name == "csr_matrix" and module.startswith("scipy.sparse"):
            return scipy.sparse.csr_matrix
        if (module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype", "scalar")
                or (module, name) in SAFE):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to build {module}.{name}")


def read_part(path: Path):
    if not path.is_file():
        raise DataError(f"dataset.root: no file {path} (Planetoid's files: ind.<name>."
                        f"{{{','.join(PARTS)},test.index}}); point dataset.root at the folder "
                        "holding them")
    try:
        with open(path, "rb") as f:
            return _PlanetoidUnpickler(f, encoding="latin1").load()
    except Exception as e:  # truncated, not a pickle, or a type it may not build
        raise DataError(f"{path}: not a Planetoid file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from e


def read_test_index(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"dataset.root: no file {path} (the test nodes, one id per line)")
    try:
        return np.array([int(line) for line in path.read_text().split()], dtype=np.int64)
    except ValueError as e:
        raise DataError(f"{path}: expected one node id per line ({e})") from e


def _dense(matrix, path: Path) -> np.ndarray:
    matrix = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    if matrix.ndim != 2:
        raise DataError(f"{path}: expected a matrix, found shape {matrix.shape}")
    return matrix.astype(np.float32)


def load_planetoid(root: Path, name: str):
    """(features, labels, edges, train, val, test) of the public split, as tensors."""
    parts = {p: read_part(root / f"ind.{name}.{p}") for p in PARTS}
    files = {p: root / f"ind.{name}.{p}" for p in PARTS}
    x, y, tx, ty, allx, ally = (_dense(parts[p], files[p]) for p in PARTS[:6])
    test_index = read_test_index(root / f"ind.{name}.test.index")
    if len(x) != len(y) or len(allx) != len(ally) or len(tx) != len(ty) or len(tx) == 0:
        raise DataError(f"{root}: ind.{name}.* disagree in their row counts (x {len(x)}, y "
                        f"{len(y)}, allx {len(allx)}, ally {len(ally)}, tx {len(tx)}, ty "
                        f"{len(ty)})")
    ordered = np.sort(test_index)
    if len(ordered) != len(tx):
        raise DataError(f"{files['tx']}: {len(tx)} test rows, but ind.{name}.test.index lists "
                        f"{len(ordered)} nodes")
    span = ordered[-1] - ordered[0] + 1
    if span > len(tx):  # CiteSeer: isolated test nodes have no row; they get zeros
        tx = _spread(tx, ordered - ordered[0], span)
        ty = _spread(ty, ordered - ordered[0], span)
    features, onehot = np.vstack([allx, tx]), np.vstack([ally, ty])
    features[test_index], onehot[test_index] = features[ordered], onehot[ordered]
    nodes = len(features)
    src, dst = _edge_list(parts["graph"], nodes, files["graph"])
    train = torch.arange(len(y))
    val = torch.arange(len(y), min(len(y) + VALIDATION_NODES, nodes))
    return (torch.from_numpy(features), torch.from_numpy(onehot.argmax(1)).long(),
            undirected_edges(src, dst, nodes), train, val, torch.from_numpy(ordered))


def _spread(rows: np.ndarray, at: np.ndarray, span: int) -> np.ndarray:
    out = np.zeros((span, rows.shape[1]), dtype=rows.dtype)
    out[at] = rows
    return out


def _edge_list(graph, nodes: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(graph, dict):
        raise DataError(f"{path}: expected a dict of neighbour lists, found {type(graph).__name__}")
    src = [int(node) for node, neighbours in graph.items() for _ in neighbours]
    dst = [int(n) for neighbours in graph.values() for n in neighbours]
    src_t, dst_t = torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)
    if len(src) and (min(src + dst) < 0 or max(src + dst) >= nodes):
        raise DataError(f"{path}: an edge names a node outside 0..{nodes - 1}")
    return src_t, dst_t


@DATASETS.register("planetoid", rules={
    "graph": one_of("cora", "citeseer", "pubmed"), "setting": SETTING,
    "teacher_view": VIEWS, "student_view": VIEWS, "row_normalize": boolean})
def planetoid(root: str, graph: str = "cora", setting: str = "transductive",
              teacher_view: str = "graph", student_view: str = "features",
              row_normalize: bool = True):
    """The Planetoid graph ``graph`` from ``root``; see the module docstring."""
    features, labels, edges, train, val, test = load_planetoid(Path(root).expanduser(), graph)
    if row_normalize:  # each node's bag of words sums to 1 (Kipf & Welling's preprocessing)
        features = features / features.sum(1, keepdim=True).clamp_min(1e-12)
    return graph_views(Graph(features, edges), labels, int(labels.max()) + 1, train, val, test,
                       setting, teacher_view, student_view, f"planetoid ({graph})")
