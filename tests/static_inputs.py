"""A ``torch.compile`` backend that checks what CUDA graphs would need of the compiled graphs' static inputs.

Under CUDA graphs (torch's CUDA graph trees, SDXL's ``fast`` profile) every input dynamo marks static (parameters,
buffers, tensor attributes of modules) must sit at the address the graph was recorded with, or the graph is
recorded again. A CPU has no CUDA graphs, so :class:`StaticInputAddresses` runs each graph as it is (eagerly) and
records the address tuples its static inputs came at, per node of the trees: the path of graphs called since
``cudagraph_mark_step_begin`` (the trees record one node per compiled call on that path; the blocks of a UNet share
graphs but not parameters) and the input shapes. Each tuple past the first is a recording a GPU would have made
again.
"""

from __future__ import annotations

from collections import defaultdict

import torch

STATIC_MARK = "_dynamo_static_input_type"


class StaticInputAddresses:
    """Use as ``backend=``; :meth:`readdressed` lists the graphs whose static inputs moved."""

    def __init__(self):
        self.graphs = 0
        #: (graph, input shapes) of the calls since the last ``cudagraph_mark_step_begin``: a node of the trees (which
        #: record a graph per input shapes)
        self.path: tuple[tuple[int, tuple], ...] = ()
        #: ``cudagraph_mark_step_begin`` calls (paths begun)
        self.paths = 0
        #: path -> {static input addresses: the tensors (kept alive, so no address can be reused)}
        self.seen: dict[tuple, dict[tuple[int, ...], list[torch.Tensor]]] = defaultdict(dict)
        #: (graph, static input names)
        self.names: dict[int, list[str]] = {}

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        graph = self.graphs
        self.graphs += 1
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        static = [i for i, node in enumerate(placeholders) if STATIC_MARK in node.meta.get("tensor_dict", {})]
        self.names[graph] = [placeholders[i].name for i in static]

        def run(*args):
            shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
            tensors = [args[i] for i in static]
            addresses = tuple(t.data_ptr() for t in tensors)
            self.path += ((graph, shapes),)
            self.seen[self.path].setdefault(addresses, tensors)
            return gm(*args)

        return run

    def step_begin(self) -> None:
        """Where ``torch.compiler.cudagraph_mark_step_begin`` is called: a new path of graphs begins."""
        self.path = ()
        self.paths += 1

    def static_inputs(self) -> int:
        return sum(len(names) for names in self.names.values())

    def readdressed(self) -> dict[tuple[int, str], int]:
        """``{(graph, static input name): addresses seen}`` for the inputs that came at more than one address at the
        same node (path of graphs and shapes)."""
        moved: dict[tuple[int, str], int] = {}
        for path, by_address in self.seen.items():
            graph = path[-1][0]
            for position, name in enumerate(self.names[graph]):
                count = len({addresses[position] for addresses in by_address})
                if count > 1:
                    moved[(graph, name)] = max(count, moved.get((graph, name), 0))
        return moved
