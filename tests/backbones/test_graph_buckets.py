"""The CUDA-graph bucket padding (fastst_plugin.graphs) checked on the CPU: a batch padded up to its
bucket with dummy sequences gives the real sequences exactly the hidden states they get unpadded."""

from __future__ import annotations

import pytest
import torch

import fastst_plugin
from fastst_plugin.graphs import _StaticBatch, bucket_seqs, bucket_seqs_no_grad, bucket_tokens
from fastst_plugin.packing import host_pack

from ._models import save_tiny


def test_buckets_grow_by_about_an_eighth():
    assert bucket_tokens(1) == 256
    assert bucket_tokens(6200) == 6656  # steps of 512 between 4096 and 8191
    assert bucket_tokens(6656) == 6656
    assert bucket_seqs(130) == 192
    # past GRAPH_MAX_TOKENS (large training steps) the steps are halved: their padding is real compute
    assert bucket_tokens(32768) == 32768 and bucket_tokens(32769) == 34816
    assert [bucket_tokens(t) for t in (50513, 49931, 48931, 46675)] == [51200, 51200, 49152, 47104]
    # a cached loss's with-gradient mini-batches: 1/16 steps throughout
    assert bucket_tokens(12407) == 13312 and bucket_tokens(12407, fine=True) == 12800
    assert bucket_tokens(1, fine=True) == 128 and bucket_tokens(32769, fine=True) == 34816


def test_cached_mini_batches_get_fine_buckets_with_gradients_only():
    from types import SimpleNamespace

    from fastst_plugin import graphs
    from fastst_plugin.cached_losses import slice_host_pack

    graphed = graphs.GraphedEncoder(SimpleNamespace(base=SimpleNamespace(training=True), uses_token_types=False), cap=256)
    ids = torch.ones(124, 100, dtype=torch.long)
    hp = host_pack(ids, torch.ones_like(ids), None)  # 12,400 tokens
    sub, _ = slice_host_pack(hp, 0, 124)
    assert graphed._key(hp, True, "off")[0] == 13312  # a plain training step
    assert graphed._key(sub, True, "off")[0] == 12800  # the cached replay: 1/16 steps
    assert graphed._key(sub, False, "off")[0] == 13312  # its no-gradient first pass: coarse, as inference


def test_inference_sequence_buckets_are_powers_of_two():
    # encode's token-budget batches hold 30-1,000 texts: a handful of graphs covers them
    assert [bucket_seqs_no_grad(n) for n in (1, 64, 65, 200, 513, 1000)] == [64, 64, 128, 256, 1024, 1024]


def test_padded_bucket_gives_the_same_hidden_states(tmp_path):
    model = save_tiny(tmp_path, "bert")
    model.eval()
    fastst_plugin.enable_fast(model, kernels="torch")
    encoder = fastst_plugin.api.get_state(model).encoder
    features = model.preprocess(["hello world", "a longer text about packages and more", "x"])
    hp = host_pack(features["input_ids"], features["attention_mask"], features.get("token_type_ids"))
    t = int(hp.cu_seqlens[-1])
    static = _StaticBatch(bucket_tokens(t), bucket_seqs(hp.num_seqs + 2), 16, torch.device("cpu"), True)
    assert static.fits(hp)
    static.fill(hp, encoder.pad_token_id)
    cu = static.cu_seqlens
    assert int(cu[hp.num_seqs]) == t and int(cu[-1]) == static.t_b
    assert int((cu[1:] - cu[:-1]).max()) <= 16  # dummy sequences respect the length cap
    lengths = (cu[1:] - cu[:-1])[hp.num_seqs :]
    spare = static.n_b - hp.num_seqs
    # the padding is spread over the spare slots: dummies as short as those allow
    assert int(lengths.max()) == -(-(static.t_b - t) // min(spare, static.t_b - t))
    with torch.no_grad():
        padded = encoder.forward_eager(static.as_packed())[:t]
        plain = encoder.forward_eager(hp.to_device("cpu"))
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)


def _fill_reference(static, hp, pad_token_id):
    """The static inputs a bucket must hold, written the plain way (one dummy sequence at a time):
    the padding split over every spare sequence slot, as short as that allows (attention over a
    dummy costs its length squared)."""
    t, n, cap = int(hp.cu_seqlens[-1]), hp.num_seqs, static.max_seqlen
    extra = static.t_b - t
    slots = min(extra, static.n_b - n)
    length = -(-extra // slots) if slots else 0
    dummy = []
    while sum(dummy) < extra:
        dummy.append(min(length, extra - sum(dummy)))
    assert len(dummy) <= slots and max(dummy, default=0) <= cap
    ids = torch.full((static.t_b,), pad_token_id, dtype=torch.long)
    ids[:t] = hp.input_ids
    pos, seq = torch.empty(static.t_b, dtype=torch.long), torch.empty(static.t_b, dtype=torch.long)
    pos[:t], seq[:t] = hp.position_ids, hp.seq_idx
    cu = torch.full((static.n_b + 1,), static.t_b, dtype=torch.int32)
    cu[: n + 1] = hp.cu_seqlens
    offset = t
    for j, length in enumerate(dummy):
        pos[offset : offset + length] = torch.arange(length)
        seq[offset : offset + length] = n + j
        offset += length
        cu[n + 1 + j] = offset
    tt = torch.zeros(static.t_b, dtype=torch.long)
    if hp.token_type_ids is not None:
        tt[:t] = hp.token_type_ids
    return ids, pos, seq * cap + pos, cu, tt


def test_fill_writes_every_static_input():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        lengths = torch.randint(1, 17, (n,), generator=gen)
        mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
        ids = torch.randint(5, 100, (n, 16), generator=gen) * mask
        tt = torch.randint(0, 2, (n, 16), generator=gen) * mask if trial % 2 else None
        hp = host_pack(ids, mask, tt)
        t = int(hp.cu_seqlens[-1])
        static = _StaticBatch(bucket_tokens(t), bucket_seqs(n + bucket_tokens(t) // 16 + 2), 16, torch.device("cpu"), True)
        static.fill(hp, 3)
        want = _fill_reference(static, hp, 3)
        got = (static.input_ids, static.position_ids, static.pad_index, static.cu_seqlens, static.token_type_ids)
        for g, w in zip(got, want):
            assert torch.equal(g, w.to(g.dtype)), trial


def _graphed(model):
    from fastst_plugin.graphs import GraphedEncoder

    encoder = fastst_plugin.api.get_state(model).encoder
    return encoder, GraphedEncoder(encoder, 16)


def test_random_numbers_are_seen_from_config_and_adapters(tmp_path):
    model = save_tiny(tmp_path, "qwen3")  # no dropout in the config
    fastst_plugin.enable_fast(model, kernels="torch", lora={"r": 4, "lora_dropout": 0.0})
    encoder = fastst_plugin.api.get_state(model).encoder
    model.train()
    assert not encoder.draws_random_numbers()
    model.eval()
    assert not encoder.draws_random_numbers()
    model = save_tiny(tmp_path / "b", "qwen3")
    fastst_plugin.enable_fast(model, kernels="torch", lora={"r": 4, "lora_dropout": 0.1})
    model.train()
    assert fastst_plugin.api.get_state(model).encoder.draws_random_numbers()


def test_checkpointed_graphs_only_without_random_numbers_or_offload(tmp_path):
    # Checkpointing inside a graph is exact only when nothing is random (the recompute inside the
    # backward graph would draw new numbers); offloading's side-stream copies cannot be captured.
    model = save_tiny(tmp_path, "qwen3")
    fastst_plugin.enable_fast(model, kernels="torch", lora={"r": 4}, gradient_checkpointing="layer")
    encoder, graphed = _graphed(model)
    model.train()
    assert graphed._checkpoint_mode(False) == "off"
    assert graphed._checkpoint_mode(True) == "layer"
    encoder.state.options.gradient_checkpointing = "offload"
    assert graphed._checkpoint_mode(True) is None
    encoder.state.options.gradient_checkpointing = "selective"
    encoder.hidden_dropout = 0.1
    assert graphed._checkpoint_mode(True) is None


def test_nothing_is_captured_inside_a_backward_pass(tmp_path):
    # A cached loss replays its mini-batches inside loss.backward(); capturing there failed on the
    # GPU, so only graphs captured ahead (GraphedEncoder.prepare) may be replayed there.
    model = save_tiny(tmp_path, "bert")
    fastst_plugin.enable_fast(model, kernels="torch", lora={"r": 4})
    encoder, graphed = _graphed(model)
    model.train()
    features = model.preprocess(["hello world", "x"])
    hp = host_pack(features["input_ids"], features["attention_mask"], features.get("token_type_ids"))
    captured = []
    graphed._capture = lambda key, hp, device: captured.append(key) or "captured"
    key = graphed._key(hp, True, "off")
    results = []
    x = torch.ones(2, requires_grad=True)
    y = (x * 2).sum()
    y.register_hook(lambda g: results.append(graphed._get_or_capture(key, hp, torch.device("cpu"))))
    y.backward()
    assert results == [None] and captured == []
    assert graphed._get_or_capture(key, hp, torch.device("cpu")) == "captured" and captured == [key]
    assert graphed._get_or_capture(key, hp, torch.device("cpu")) == "captured" and len(captured) == 1


def test_host_pack_moves_in_one_staging_copy():
    """HostPack.to on CUDA stages every integer field in one buffer (here run with the CPU as the
    target): same values, dtypes and shapes as field-by-field copies."""
    from fastst_plugin.packing import _to_cuda_at_once

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    hp = host_pack(torch.arange(12).view(3, 4) * mask, mask, torch.ones(3, 4, dtype=torch.long) * mask)
    tensors = {k: v for k, v in vars(hp).items() if isinstance(v, torch.Tensor)}
    moved = _to_cuda_at_once(tensors, "cpu")
    assert moved.keys() == tensors.keys()
    for k, v in tensors.items():
        assert moved[k].dtype == v.dtype and moved[k].shape == v.shape and torch.equal(moved[k], v), k


def test_capture_stand_ins_give_the_parameters_gradients(tmp_path):
    """Captures differentiate against stand-in leaves that share the parameters' storage (DDP keeps
    the parameters' own AccumulateGrad nodes on the default stream): same forward, same gradients,
    parameters restored afterwards, tied parameters replaced by one leaf."""
    from fastst_plugin.graphs import _stand_ins

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    net[2].weight = net[0].weight  # tied
    net[0].bias.requires_grad_(False)
    params = tuple(p for p in net.parameters() if p.requires_grad)
    x = torch.randn(3, 4)
    expected = torch.autograd.grad(net(x).square().sum(), params)
    before = {name: p for name, p in net.named_parameters()}
    with _stand_ins(net, params) as leaves:
        assert len(leaves) == len(params)
        assert net[0].weight is net[2].weight and net[0].weight is not params[0]
        assert all(l.data_ptr() == p.data_ptr() and l.is_leaf for l, p in zip(leaves, params))
        assert net[0].bias is before["0.bias"]  # frozen: untouched
        got = torch.autograd.grad(net(x).square().sum(), leaves)
    assert dict(net.named_parameters()) == before
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_graphs_under_ddp_policy(monkeypatch):
    """Under a process group: FASTST_DDP_GRAPHS=1 always, 0 never, unset only without dropout."""
    from types import SimpleNamespace

    from fastst_plugin.graphs import _ddp_graphs

    dropout = SimpleNamespace(draws_random_numbers=lambda: True)
    plain = SimpleNamespace(draws_random_numbers=lambda: False)
    monkeypatch.delenv("FASTST_DDP_GRAPHS", raising=False)
    assert _ddp_graphs(plain) and not _ddp_graphs(dropout)
    monkeypatch.setenv("FASTST_DDP_GRAPHS", "1")
    assert _ddp_graphs(plain) and _ddp_graphs(dropout)
    monkeypatch.setenv("FASTST_DDP_GRAPHS", "0")
    assert not _ddp_graphs(plain) and not _ddp_graphs(dropout)


def _policy_encoder(monkeypatch, no_room=()):
    """A GraphedEncoder whose capture is a stand-in (records keys; raises _NoRoom for ``no_room``)."""
    from fastst_plugin import graphs

    graphed = graphs.GraphedEncoder(encoder=None, cap=1024)
    captured = []

    def fake_capture(key, hp, device):
        if key in no_room:
            raise graphs._NoRoom("test: no room")
        captured.append(key)
        return object()

    monkeypatch.setattr(graphed, "_capture", fake_capture)
    return graphed, captured


def _key(tokens, grad=True):
    return (tokens, 192, True, True, "off", grad)


def test_large_training_buckets_are_captured_when_they_recur(monkeypatch):
    from fastst_plugin import graphs

    graphed, captured = _policy_encoder(monkeypatch)
    small, large = _key(8192), _key(49152)
    assert graphed._get_or_capture(small, None, "cuda") is not None  # short texts: first sight
    assert graphed._get_or_capture(large, None, "cuda") is None  # long documents: eager once...
    assert graphed._get_or_capture(large, None, "cuda") is not None  # ...captured when the size recurs
    assert graphed._get_or_capture(_key(49152, grad=False), None, "cuda") is None  # inference: never
    assert graphed._get_or_capture(_key(49152, grad=False), None, "cuda") is None
    for tokens in (51200, 53248, 55296, 57344):  # at most MAX_LARGE_GRAPHS large buckets
        for _ in range(3):
            graphed._get_or_capture(_key(tokens), None, "cuda")
    assert graphs.MAX_LARGE_GRAPHS == 4
    assert [k[0] for k in captured] == [8192, 49152, 51200, 53248, 55296]
    assert graphed.disabled_reason is None


def test_a_step_without_its_graph_replays_a_larger_captured_bucket(monkeypatch):
    # Bucket slots used up (or inside a backward pass, where nothing is captured): a step replays the
    # smallest captured bucket it fits, up to FALLBACK_PADDING x its own bucket, instead of running
    # eagerly (host-bound below GRAPH_MAX_TOKENS); further off, or for a large step, it stays eager.
    from types import SimpleNamespace

    from fastst_plugin import graphs

    graphed, captured = _policy_encoder(monkeypatch)
    monkeypatch.setattr(graphed, "_capture", lambda key, hp, device: SimpleNamespace(
        static=_StaticBatch(key[0], key[1], 1024, torch.device("cpu"), False)))
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    for tokens in (12288, 9216):
        assert graphed._get_or_capture(_key(tokens), None, "cuda") is graphed.graphs[_key(tokens)]

    def pack(texts, length):
        return host_pack(torch.ones(texts, length, dtype=torch.long), torch.ones(texts, length, dtype=torch.long))

    hp = pack(100, 75)  # 7,500 tokens: bucket 7,680, whose slot is taken -> the 9,216 graph
    assert graphed._get_or_capture(_key(bucket_tokens(7500)), hp, "cuda") is graphed.graphs[_key(9216)]
    assert graphed._get_or_capture(_key(bucket_tokens(7500), grad=False), hp, "cuda") is None  # no such graph
    hp = pack(50, 100)  # 5,000 tokens: 9,216 is over 1.5 x 5,120 -> eager
    assert graphed._get_or_capture(_key(bucket_tokens(5000)), hp, "cuda") is None
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 8)
    monkeypatch.setattr(torch._C, "_current_graph_task_id", lambda: 0)  # inside a backward pass
    hp = pack(110, 100)  # 11,000 tokens: bucket 11,264 -> the 12,288 graph, nothing captured
    assert graphed._get_or_capture(_key(bucket_tokens(11000)), hp, "cuda") is graphed.graphs[_key(12288)]
    assert len(graphed.graphs) == 2


def test_large_bucket_without_room_stays_eager_alone(monkeypatch):
    large = _key(65536)
    graphed, captured = _policy_encoder(monkeypatch, no_room={large})
    for _ in range(4):
        assert graphed._get_or_capture(large, None, "cuda") is None
    assert large in graphed._no_room and graphed.disabled_reason is None  # the model keeps its graphs
    assert graphed._get_or_capture(_key(4096), None, "cuda") is not None


def test_large_graphs_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FASTST_LARGE_GRAPHS", "0")
    graphed, captured = _policy_encoder(monkeypatch)
    for _ in range(3):
        assert graphed._get_or_capture(_key(49152), None, "cuda") is None
    assert captured == []


def test_autocast_dtype_is_part_of_the_bucket(monkeypatch):
    # A graph captured under bf16 autocast replays bf16 casts: it must not serve a step without
    # autocast (or under fp16), and vice versa.
    from types import SimpleNamespace

    from fastst_plugin import graphs

    graphed = graphs.GraphedEncoder(SimpleNamespace(base=SimpleNamespace(training=True), uses_token_types=True), cap=16)
    hp = host_pack(torch.tensor([[5, 6, 7], [5, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    plain = graphed._key(hp, True, "off")
    monkeypatch.setattr(graphs, "_autocast_dtype", lambda: torch.bfloat16)
    amp = graphed._key(hp, True, "off")
    assert plain != amp and amp[-1] is True and amp[-2] == "off"
    assert graphs._capture_autocast(None).__class__.__name__ == "nullcontext"


def test_graphs_under_autocast_are_on_unless_turned_off(monkeypatch):
    from fastst_plugin import graphs

    monkeypatch.delenv("FASTST_AUTOCAST_GRAPHS", raising=False)
    assert graphs._autocast_graphs()  # GPU parity: tests/gpu/gpu_checks.py amp (H200, 2026-11-29)
    monkeypatch.setenv("FASTST_AUTOCAST_GRAPHS", "0")
    assert not graphs._autocast_graphs()
    monkeypatch.setenv("FASTST_AUTOCAST_GRAPHS", "1")
    assert graphs._autocast_graphs()


def test_room_for_a_large_capture_counts_the_shared_pools_idle_bytes(monkeypatch):
    """The first large capture needs LARGE_GRAPH_HEADROOM x its activations free (+ margin); a later
    one into the same pool reuses the pool's idle blocks and needs only the growth beyond them plus
    room for an eager step. Segments of other pools and blocks in use do not count."""
    from fastst_plugin import graphs

    gib = 1 << 30
    held = 30 * gib
    state = {"free": 45 * gib, "segments": []}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: state["segments"])
    pool = (0, 7)

    # First capture (empty pool): 2.2 x 30 + 2 = 68 GiB wanted, 45 free -> refused; 70 free -> fine.
    with pytest.raises(graphs._NoRoom, match="68.0 GiB wanted"):
        graphs._check_room("cuda", held, pool)
    state["free"] = 70 * gib
    graphs._check_room("cuda", held, pool)

    # After it: the pool holds ~36 GiB, 34 of them idle (activations released after the backward
    # capture); 45 GiB free. Growth 1.2 x 30 - 0.9 x 34 = 5.4 -> 5.4 + 30 + 2 = 37.4 wanted: fine.
    state["free"] = 45 * gib
    state["segments"] = [
        {"segment_pool_id": pool, "total_size": 36 * gib, "active_size": 2 * gib},
        {"segment_pool_id": (0, 0), "total_size": 20 * gib, "active_size": 0},  # general cache: not ours
    ]
    graphs._check_room("cuda", held, pool)
    # The same pool busy (its blocks in use) gives nothing to reuse: refused as the first capture.
    state["segments"][0]["active_size"] = 36 * gib
    with pytest.raises(graphs._NoRoom):
        graphs._check_room("cuda", held, pool)


def test_frozen_weight_writes_drop_the_graphs_and_the_cached_concatenation(tmp_path):
    # Graphs read FusedProjection's cached concatenation of frozen weights (Q/K/V) instead of
    # concatenating at every replay: an in-place write to a frozen weight must change the graphs'
    # parameter signature (they are dropped and captured again) and the concatenation. Optimizer
    # steps on trained parameters must not.
    from fastst_plugin.linear import FusedProjection

    model = save_tiny(tmp_path, "bert")
    fastst_plugin.enable_fast(model, kernels="torch", lora={"r": 4})
    encoder, graphed = _graphed(model)
    qkv = encoder.layers[0].qkv
    assert isinstance(qkv, FusedProjection)
    frozen = [m.base_layer.weight for m in qkv.modules]
    biases = [m.base_layer.bias for m in qkv.modules]
    first = qkv._frozen_cat(frozen)
    bias_cat = qkv._frozen_cat(biases)
    # cached while nothing moves, the weights and the biases each in their own slot (a graph holds both)
    assert qkv._frozen_cat(frozen) is first and qkv._frozen_cat(biases) is bias_cat
    qkv._cache.clear()
    with torch.inference_mode():  # kept from an encode() call, then used by a training step
        kept = qkv._frozen_cat(frozen)
    assert not kept.is_inference() and qkv._frozen_cat(frozen) is kept
    first = kept
    signature = graphed._param_signature()
    trained = next(p for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        trained.add_(1.0)
    assert graphed._param_signature() == signature
    with torch.no_grad():
        frozen[1].mul_(2.0)
    assert graphed._param_signature() != signature
    again = qkv._frozen_cat(frozen)
    assert again is not first and torch.equal(again, torch.cat([w.detach() for w in frozen], 0))
