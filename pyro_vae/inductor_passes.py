"""A graph pass for Inductor's CPU code, which every :class:`~pyro_vae.compiled.CompiledCall` runs.

A ``Linear`` layer is ``addmm(b, x, W^T)`` in the graphs Inductor lowers,
and on the CPU ``addmm`` first copies the bias ``b`` into every row of its
output, then has the matrix product (sgemm with beta = 1) add ``x W^T`` to
it: a pass over the output before the product.  Where every use of the
output is pointwise (the activation after a hidden layer, the Bernoulli
log-density over the logits), the same value is ``mm(x, W^T) + b``, and
Inductor fuses the ``+ b`` into the loop that reads the product anyway.
Inductor makes this rewrite on GPUs only (``should_prefer_unfused_addmm``);
:class:`BiasIntoPointwise` makes it on the CPU, after Inductor's own
patterns (which would fuse ``mm + b`` back into ``addmm``).

Measured on the IS evaluator's compiled chunk (Burda's model, 500 samples
of 10 images, 2 threads): the bias copies took 12% of the chunk's time, and
the chunk runs 5-6% faster without them.  The training step, whose
products are 100 rows, does not change measurably.
"""
from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.utils import is_pointwise_use

aten = torch.ops.aten
FULL_PRECISION = (torch.float32, torch.float64)  # (in half precision the product would be rounded before the bias)


class BiasIntoPointwise(CustomGraphPass):
    """Rewrites ``addmm(b, x, W)`` (alpha = beta = 1, float32 or float64) on
    the CPU into ``mm(x, W) + b`` where every use of its output is pointwise.
    (It takes Inductor's ``post_grad_custom_post_pass`` slot in the compiled
    calls' options: a pass of one's own set there does not run in them.)"""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.find_nodes(op="call_function", target=aten.addmm.default)):
            if len(node.args) != 3:
                continue
            bias, mat1, mat2 = node.args
            value = node.meta.get("val")
            if (value is None or value.device.type != "cpu" or value.dtype not in FULL_PRECISION
                    or node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1
                    or any(getattr(arg, "meta", {}).get("val") is None for arg in node.args)
                    or not node.users or not all(is_pointwise_use(use) for use in node.users)):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(aten.mm.default, (mat1, mat2))
                product.meta["val"] = aten.mm.default(mat1.meta["val"], mat2.meta["val"])
                biased = graph.call_function(aten.add.Tensor, (product, bias))
                biased.meta["val"] = aten.add.Tensor(product.meta["val"], bias.meta["val"])
            node.replace_all_uses_with(biased)
            graph.erase_node(node)

    def uuid(self) -> bytes:
        """Inductor's cache key: this file's contents."""
        return get_hash_for_files((__file__,))
