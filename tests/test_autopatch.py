"""patch()/unpatch() and the import hook, in this process (the subprocess paths are in test_startup.py)."""

import textwrap

import pytest

import fastst_plugin
from fastst_plugin import api, autopatch

CLASS_NAMES = autopatch.PATCHED_CLASSES


@pytest.fixture
def st_classes():
    import sentence_transformers

    classes = [getattr(sentence_transformers, name) for name in CLASS_NAMES]
    originals = {cls: cls.__dict__["__init__"] for cls in classes}
    yield classes
    fastst_plugin.unpatch()
    for cls, original in originals.items():
        assert cls.__dict__["__init__"] is original, f"{cls.__name__}.__init__ not restored"


@pytest.fixture
def enable_calls(monkeypatch):
    """Record the enable_fast calls made by patched constructors (without doing the work)."""
    calls = []

    def fake_enable_fast(model, lora=None, **options):
        calls.append((model, lora, options))
        return model

    monkeypatch.setattr(api, "enable_fast", fake_enable_fast)
    return calls


def test_patch_unpatch_round_trip(st_classes, tiny_bert_path):
    from sentence_transformers import SentenceTransformer

    originals = {cls: cls.__dict__["__init__"] for cls in st_classes}
    fastst_plugin.patch(kernels="off")
    assert autopatch.is_patched()
    for cls in st_classes:
        assert cls.__dict__["__init__"] is not originals[cls]
        assert cls.__init__.__wrapped__ is originals[cls]  # functools.wraps keeps the signature visible
    model = SentenceTransformer(tiny_bert_path, device="cpu")
    assert fastst_plugin.is_fast(model)

    fastst_plugin.patch(kernels="off")  # idempotent: no second layer of wrapping
    for cls in st_classes:
        assert cls.__init__.__wrapped__ is originals[cls]

    fastst_plugin.unpatch()
    assert not autopatch.is_patched()
    for cls in st_classes:
        assert cls.__dict__["__init__"] is originals[cls]
    assert fastst_plugin.is_fast(model), "unpatch() leaves already-built models alone"
    assert not fastst_plugin.is_fast(SentenceTransformer(tiny_bert_path, device="cpu"))
    fastst_plugin.unpatch()  # idempotent


def test_patch_passes_defaults_and_env_lora(st_classes, enable_calls, tiny_bert_path, monkeypatch):
    from sentence_transformers import SentenceTransformer

    monkeypatch.setenv("FASTST_LORA", "8")
    fastst_plugin.patch(gradient_checkpointing=True)
    model = SentenceTransformer(tiny_bert_path, device="cpu")
    assert enable_calls == [(model, 8, {"gradient_checkpointing": True})]

    fastst_plugin.patch(lora=4)  # a second patch() replaces the defaults
    SentenceTransformer(tiny_bert_path, device="cpu")
    assert enable_calls[-1][1:] == (4, {})


def test_patch_rejects_unknown_options(st_classes):
    with pytest.raises(TypeError, match="bogus"):
        fastst_plugin.patch(bogus=1)
    assert not autopatch.is_patched()


def test_subclass_super_init_enables_once(st_classes, enable_calls, tiny_bert_path):
    from sentence_transformers import SentenceTransformer

    class MySentenceTransformer(SentenceTransformer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = True

    fastst_plugin.patch()
    model = MySentenceTransformer(tiny_bert_path, device="cpu")
    assert [c[0] for c in enable_calls] == [model]


def test_model_built_inside_enable_fast_is_left_alone(st_classes, monkeypatch, tiny_bert_path):
    from sentence_transformers import SentenceTransformer

    calls = []

    def nested_enable_fast(model, lora=None, **options):
        calls.append(model)
        SentenceTransformer(tiny_bert_path, device="cpu")  # e.g. a helper model built while enabling
        return model

    monkeypatch.setattr(api, "enable_fast", nested_enable_fast)
    fastst_plugin.patch()
    outer = SentenceTransformer(tiny_bert_path, device="cpu")
    assert calls == [outer]


def test_enable_failure_warns_and_leaves_model_stock(st_classes, monkeypatch, tiny_bert_path):
    from sentence_transformers import SentenceTransformer

    warnings = []
    monkeypatch.setattr(autopatch, "warn_once", warnings.append)

    def failing_enable_fast(model, lora=None, **options):
        real_enable_fast(model, kernels="off")  # got half-way...
        raise RuntimeError("unsupported thing")

    real_enable_fast = api.enable_fast
    monkeypatch.setattr(api, "enable_fast", failing_enable_fast)
    fastst_plugin.patch()
    model = SentenceTransformer(tiny_bert_path, device="cpu")  # must not raise
    assert not fastst_plugin.is_fast(model)
    assert len(warnings) == 1 and "unsupported thing" in warnings[0] and "stays stock" in warnings[0]
    assert model.encode(["still works"]).shape == (1, 32)


def test_bad_env_in_hook_warns_instead_of_breaking_the_import(st_classes, monkeypatch):
    import sentence_transformers

    warned = []
    monkeypatch.setattr(autopatch.logger, "warning", warned.append)
    monkeypatch.setenv("FASTST_KERNELS", "no-such-mode")
    autopatch._on_sentence_transformers_imported(sentence_transformers)  # must not raise
    assert not autopatch.is_patched()
    assert warned and "no-such-mode" in warned[0]


def test_hook_registration_waits_for_wrapt(run_python, tmp_path):
    """At interpreter start the startup file can run before the site directory that holds wrapt is on
    sys.path (a venv with --system-site-packages, a --user install). Registration then waits, and the
    hook still fires for a sentence_transformers imported later (a stand-in module here)."""
    (tmp_path / "sentence_transformers.py").write_text("STAND_IN = True\n")
    code = textwrap.dedent(
        """
        import sys

        class HideWrapt:
            hidden = True
            def find_spec(self, name, path=None, target=None):
                if self.hidden and name.split(".")[0] == "wrapt":
                    raise ImportError("hidden for the test")
                return None

        hider = HideWrapt()
        sys.meta_path.insert(0, hider)
        from fastst_plugin import autopatch

        fired = []
        autopatch._on_sentence_transformers_imported = lambda module: fired.append(module.__name__)
        autopatch.register_import_hook()
        assert not autopatch._hook_registered, "wrapt is hidden: registration must wait"
        import colorsys  # an import while wrapt is still missing: the waiting finder tries, and waits on
        assert not autopatch._hook_registered
        hider.hidden = False
        sys.path.append("/nonexistent")  # as when site adds the next site directory
        import sentence_transformers
        assert sentence_transformers.STAND_IN and "wrapt" in sys.modules
        print("REGISTERED", autopatch._hook_registered)
        print("FIRED", fired)
        """
    )
    proc, report = run_python(["-c", code], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report == {"REGISTERED": "True", "FIRED": "['sentence_transformers']"}


def test_env_switches_and_modes_read_the_same_words(monkeypatch):
    # Every FASTST_* on/off switch and multi-valued setting parses on/off the same way, at each call.
    from fastst_plugin.config import env_mode, env_switch

    monkeypatch.delenv("FASTST_TEST_SETTING", raising=False)
    assert env_switch("FASTST_TEST_SETTING") and env_mode("FASTST_TEST_SETTING") == "auto"
    assert env_mode("FASTST_TEST_SETTING", "inference") == "inference"
    for word, on in (("0", False), ("False", False), (" off ", False), ("no", False), ("1", True), ("yes", True), ("ON", True)):
        monkeypatch.setenv("FASTST_TEST_SETTING", word)
        assert env_switch("FASTST_TEST_SETTING") is on
        assert env_mode("FASTST_TEST_SETTING") == ("on" if on else "off")
    monkeypatch.setenv("FASTST_TEST_SETTING", "Graph")
    assert env_mode("FASTST_TEST_SETTING") == "graph" and env_switch("FASTST_TEST_SETTING")
    monkeypatch.setenv("FASTST_TEST_SETTING", "")
    assert env_mode("FASTST_TEST_SETTING", "inference") == "inference"
