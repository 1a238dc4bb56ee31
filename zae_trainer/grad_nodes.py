"""Keep the parameters' gradient-accumulator nodes alive for a training phase.

Autograd ends every parameter's branch of the graph in an ``AccumulateGrad`` node, which
adds the incoming gradient into ``param.grad``. The parameter holds it only weakly: once a
step's graph is freed, the node is destroyed, and the next forward pass builds a new one
(an allocation, its input metadata, and the destruction later: about 700 CPU instructions
per parameter per step, measured with callgrind). A hand-written loop rarely pays this,
because its ``loss`` variable keeps the previous step's graph, and so the nodes, alive until
the next forward; the trainer drops each step's outputs, so it holds the nodes themselves
instead: no graph, no activations, only one small node per parameter. DDP's reducer holds
them for the same reason (it hooks them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["hold_grad_accumulators"]


def hold_grad_accumulators(model: nn.Module) -> list[Any]:
    """The ``AccumulateGrad`` nodes of ``model``'s trainable plain parameters; keep the list alive.

    Only plain ``nn.Parameter`` objects are asked (a one-element view each, under grad mode):
    sharded (DTensor) and other tensor-subclass parameters are left alone, since a view of
    one may be more than a local operation.
    """
    nodes = []
    with torch.enable_grad():
        for param in model.parameters():
            if type(param) is nn.Parameter and param.requires_grad:
                grad_fn = param.view_as(param).grad_fn
                if grad_fn is not None and grad_fn.next_functions:
                    nodes.append(grad_fn.next_functions[0][0])
    return nodes
