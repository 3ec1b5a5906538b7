"""The catalogue's tanh: 2 sigmoid(2a) - 1 where that is faster (the CPU
without gradients, and compiled), exact to float32 rounding, with tanh's
gradient; torch.tanh elsewhere."""
import torch
from torch.autograd import gradcheck, gradgradcheck

from pyro_vae.nn import SigmoidTanh, Tanh, mlp, sigmoid_tanh


def _points() -> torch.Tensor:
    grid = torch.linspace(-12, 12, 20001)
    extremes = torch.tensor([0.0, 1e-30, -1e-30, 1e-6, -1e-6, 40.0, -40.0, 1e30, -1e30])
    return torch.cat([grid, extremes])


def test_the_sigmoid_form_is_tanh_to_float32_rounding():
    a = _points()
    exact = torch.tanh(a.double())
    ours = sigmoid_tanh(a)
    assert ours.dtype == torch.float32
    assert (ours.double() - exact).abs().max() <= 2.5e-7  # 1.8e-7 measured; torch.tanh's 3e-8
    assert torch.equal(ours[a.abs() > 10], torch.sign(a[a.abs() > 10]))  # saturates exactly, no NaN at 1e30
    before = a.clone()
    with torch.no_grad():
        Tanh()(a)
    assert torch.equal(a, before)  # its passes in place are on a new tensor, never the argument


def test_its_gradient_is_tanhs():
    a = _points().requires_grad_()
    grad_out = torch.rand_like(a)
    SigmoidTanh.apply(a).backward(grad_out)
    exact = grad_out.double() * (1 - torch.tanh(a.detach().double()) ** 2)
    assert (a.grad.double() - exact).abs().max() <= 5e-7  # 3.2e-7 measured; torch.tanh's 7e-8


def test_its_gradients_first_and_second_by_finite_differences():
    a = torch.randn(40, dtype=torch.float64, requires_grad=True) * 3
    assert gradcheck(SigmoidTanh.apply, (a,))
    assert gradgradcheck(SigmoidTanh.apply, (a,))


def test_the_module_takes_the_sigmoid_form_without_gradients_and_torch_tanh_with_them():
    a = _points()
    with torch.no_grad():
        assert torch.equal(Tanh()(a), sigmoid_tanh(a))
    leaf = a.clone().requires_grad_()
    out = Tanh()(leaf)
    assert torch.equal(out, torch.tanh(a)) and type(out.grad_fn).__name__ == "TanhBackward0"


def test_compiled_it_gives_tanh_and_its_gradient():
    a = (torch.randn(64, 32) * 3).requires_grad_()
    grad_out = torch.rand(64, 32)
    out = torch.compile(Tanh(), fullgraph=True)(a)
    (grad,) = torch.autograd.grad(out, a, grad_out)
    exact = torch.tanh(a.detach().double())
    assert (out.detach().double() - exact).abs().max() <= 2.5e-7
    assert (grad.double() - grad_out.double() * (1 - exact ** 2)).abs().max() <= 5e-7


def test_the_mlp_uses_it_and_keeps_nn_tanhs_state_dict():
    net = mlp(3, [5, 5], 2, "tanh")
    assert sum(isinstance(m, Tanh) for m in net) == 2
    assert list(net.state_dict()) == list(torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5), torch.nn.Tanh(),
        torch.nn.Linear(5, 2)).state_dict())  # checkpoints written with nn.Tanh still load


def test_tensor_subclasses_keep_their_provenance():
    """Pyro's provenance tensors flow through the networks under
    ``pyro.infer.inspect``."""
    from pyro.ops.provenance import get_provenance, track_provenance

    a = track_provenance(torch.randn(4), frozenset({"z"}))
    assert get_provenance(Tanh()(a)) == frozenset({"z"})
    with torch.no_grad():
        assert get_provenance(Tanh()(a)) == frozenset({"z"})
