"""Gradient comparison the inference and SPLADE tests share."""


def assert_grads_close(got, ref, rtol=1e-4, zero_below=None):
    """Every parameter gradient within ``rtol`` relative error of the reference. Attention key biases
    (mathematically zero: softmax is shift-invariant) and, with ``zero_below``, gradients whose
    reference norm is at most ``zero_below`` x the largest one are compared in absolute terms."""
    assert set(got) == set(ref) and ref
    scale = max(g.norm() for g in ref.values())
    for name, g_ref in ref.items():
        if name.endswith("key.bias") or (zero_below is not None and g_ref.norm() <= zero_below * scale):
            assert (got[name] - g_ref).norm() <= 1e-5 * scale, name
            continue
        err = (got[name] - g_ref).norm() / g_ref.norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative gradient error {err:.2e}"
