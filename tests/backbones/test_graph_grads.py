"""How a replayed (CUDA-graphed) step hands its parameter gradients to autograd, checked on the CPU
with a stand-in capture whose "replays" compute what the captured graphs would."""

from __future__ import annotations

import pytest
import torch

from fastst_plugin import graphs


class _Replay:
    def __init__(self, fn):
        self.replay = fn


def _fake_capture(weight: torch.Tensor, x: torch.Tensor):
    """A 'captured' y = x @ W.T: static output, static output gradient, static parameter gradient."""
    out = torch.zeros(x.shape[0], weight.shape[0])
    grad_out = torch.zeros_like(out)
    grad_w = torch.zeros_like(weight)

    def fwd():
        out.copy_(x @ weight.detach().T)

    def bwd():
        grad_w.copy_(grad_out.T @ x)

    cap = graphs._Captured(_Replay(fwd), _Replay(bwd), None, out, grad_out, (weight,), (grad_w,))
    return cap


def _graphed_encoder():
    return graphs.GraphedEncoder(encoder=None, cap=16)


def _step(owner, cap, weight, direct: bool):
    if direct:
        y = graphs._GraphedStepDirect.apply(cap, owner._anchor_for(torch.device("cpu")))
    else:
        y = graphs._GraphedStep.apply(cap, weight)
    cap.owner = owner
    return y


@pytest.mark.parametrize("direct", [True, False])
def test_replayed_gradients_equal_autograd_and_accumulate(direct):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(5, 4)
    target = torch.randn(5, 3)
    expected = torch.autograd.grad(((x @ weight.T) * target).sum(), weight)[0]
    owner, cap = _graphed_encoder(), _fake_capture(weight, x)

    (_step(owner, cap, weight, direct) * target).sum().backward()
    torch.testing.assert_close(weight.grad, expected)
    first = weight.grad
    (_step(owner, cap, weight, direct) * target).sum().backward()  # gradient accumulation
    torch.testing.assert_close(weight.grad, 2 * expected)
    assert weight.grad is first  # accumulated in place, as AccumulateGrad does
    assert weight.grad.data_ptr() != cap.grad_params[0].data_ptr()  # never the static buffer itself
    weight.grad = None
    (_step(owner, cap, weight, direct) * target).sum().backward()
    torch.testing.assert_close(weight.grad, expected)


def test_direct_gradients_are_not_served_to_autograd_grad():
    # The documented limit: the parameters are not in the autograd graph (FASTST_GRAPH_GRADS=edges
    # serves torch.autograd.grad); torch says so rather than returning a wrong gradient.
    weight = torch.nn.Parameter(torch.randn(3, 4))
    owner, cap = _graphed_encoder(), _fake_capture(weight, torch.randn(5, 4))
    loss = _step(owner, cap, weight, direct=True).sum()
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(loss, [weight])


def test_direct_gradients_only_without_hooks_or_opt_out(monkeypatch):
    weight = torch.nn.Parameter(torch.randn(3, 4))
    assert graphs._direct_grads_possible((weight,))
    monkeypatch.setenv("FASTST_GRAPH_GRADS", "edges")
    assert not graphs._direct_grads_possible((weight,))
    monkeypatch.delenv("FASTST_GRAPH_GRADS")
    handle = weight.register_post_accumulate_grad_hook(lambda p: None)
    assert not graphs._direct_grads_possible((weight,))  # hooks run in AccumulateGrad: keep the edges
    handle.remove()
    handle = weight.register_hook(lambda g: g)
    assert not graphs._direct_grads_possible((weight,))
    handle.remove()
    assert graphs._direct_grads_possible((weight,))


def _fake_sink_capture(weight: torch.Tensor, x: torch.Tensor, sink):
    """A 'captured' y = x @ W.T whose backward adds its gradient into a shared sink (as the graph does)."""
    out = torch.zeros(x.shape[0], weight.shape[0])
    grad_out = torch.zeros_like(out)

    def fwd():
        out.copy_(x @ weight.detach().T)

    def bwd():
        sink.slots[0].add_(grad_out.T @ x)

    return graphs._Captured(_Replay(fwd), _Replay(bwd), None, out, grad_out, (weight,), None, sink, (0,))


@pytest.mark.parametrize("direct", [True, False])
def test_buckets_sharing_a_gradient_sink_accumulate_like_autograd(direct):
    # Two buckets (two captures, one sink) in one step, then gradient accumulation, then a fresh
    # step after zero_grad(set_to_none=True), then a .grad the user set: autograd's sums every time.
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 4))
    x1, x2, target = torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 3)
    g1 = torch.autograd.grad(((x1 @ weight.T) * target).sum(), weight)[0]
    g2 = torch.autograd.grad(((x2 @ weight.T) * target[:2]).sum(), weight)[0]
    sink = graphs._GradSink((weight,))
    owner = _graphed_encoder()
    cap1, cap2 = _fake_sink_capture(weight, x1, sink), _fake_sink_capture(weight, x2, sink)

    def step():
        ((_step(owner, cap1, weight, direct) * target).sum() + (_step(owner, cap2, weight, direct) * target[:2]).sum()).backward()

    step()
    torch.testing.assert_close(weight.grad, g1 + g2)
    assert (weight.grad is sink.slots[0]) == direct  # direct: the slot is .grad; edges: copies
    step()  # accumulation
    torch.testing.assert_close(weight.grad, 2 * (g1 + g2))
    weight.grad = None
    step()
    torch.testing.assert_close(weight.grad, g1 + g2)
    weight.grad = mine = torch.ones_like(weight)
    step()
    assert weight.grad is mine
    torch.testing.assert_close(mine, 1 + g1 + g2)
    weight.grad = None
    (_step(owner, cap1, weight, not direct) * target).sum().backward()  # the other mode next
    torch.testing.assert_close(weight.grad, g1)


def test_gradient_sink_for_large_gradient_sets_unless_switched(monkeypatch):
    small = (torch.nn.Parameter(torch.zeros(1024)),)
    large = (torch.nn.Parameter(torch.zeros(graphs.GRAD_SINK_MIN_BYTES // 4)),)  # fp32: exactly the threshold
    monkeypatch.delenv("FASTST_GRAPH_GRAD_SINK", raising=False)
    assert graphs._grad_sink_wanted(large) and not graphs._grad_sink_wanted(small)  # auto: full FT, not LoRA
    monkeypatch.setenv("FASTST_GRAPH_GRAD_SINK", "1")
    assert graphs._grad_sink_wanted(small)
    monkeypatch.setenv("FASTST_GRAPH_GRAD_SINK", "0")
    assert not graphs._grad_sink_wanted(large)
