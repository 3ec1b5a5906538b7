"""The CPU bias pass: ``addmm`` with only pointwise uses becomes ``mm + b``, with the same value."""
import pyro
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_vae import compiled
from pyro_vae.compiled import CompiledCall
from pyro_vae.inductor_passes import BiasIntoPointwise

aten = torch.ops.aten


def targets(gm: torch.fx.GraphModule) -> list:
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def rewritten(fn, *args) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``fn``'s aten graph (fake-traced, so each node has its ``val``) before and after the pass."""
    before = make_fx(fn, tracing_mode="fake")(*args)
    after = make_fx(fn, tracing_mode="fake")(*args)
    BiasIntoPointwise()(after.graph)
    after.recompile()
    return before, after


def layer_inputs():
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(5, 7, generator=generator), torch.randn(7, 3, generator=generator),
            torch.randn(3, generator=generator))


def test_a_layer_whose_output_is_only_read_pointwise_adds_its_bias_after_the_product():
    def layer(x, w, b):
        return torch.tanh(torch.addmm(b, x, w)) * 2

    before, after = rewritten(layer, *layer_inputs())
    assert aten.addmm.default in targets(before)
    assert aten.addmm.default not in targets(after)
    assert aten.mm.default in targets(after) and aten.add.Tensor in targets(after)
    torch.testing.assert_close(after(*layer_inputs()), layer(*layer_inputs()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["reduced", "multiplied", "scaled", "bfloat16"])
def test_an_addmm_read_by_anything_but_pointwise_ops_scaled_or_in_half_precision_is_left_alone(case):
    def layer(x, w, b):
        if case == "scaled":
            return torch.addmm(b, x, w, beta=0.5).exp()
        if case == "bfloat16":  # (mm + b would round the product before adding the bias)
            return torch.addmm(b.bfloat16(), x.bfloat16(), w.bfloat16()).exp()
        out = torch.addmm(b, x, w)
        return out.sum(-1) if case == "reduced" else out @ w.T

    _, after = rewritten(layer, *layer_inputs())
    assert aten.addmm.default in targets(after)


def test_compiled_calls_run_the_pass_and_keep_the_layers_value(monkeypatch):
    linear = torch.nn.Linear(7, 3)
    x = layer_inputs()[0]
    seen = []

    class Recording(BiasIntoPointwise):
        def __call__(self, graph):
            super().__call__(graph)
            seen.append([node.target for node in graph.nodes if node.op == "call_function"])

    monkeypatch.setattr(compiled, "BiasIntoPointwise", Recording)
    call = CompiledCall(lambda x: torch.tanh(linear(x)), "a layer")
    with torch.no_grad(), pyro.validation_enabled(False), torch._inductor.config.patch(fx_graph_cache=False):
        torch.testing.assert_close(call(x), torch.tanh(linear(x)), rtol=1e-5, atol=1e-6)
    assert call.compiled is not None
    assert seen and aten.mm.default in seen[0] and aten.addmm.default not in seen[0]
