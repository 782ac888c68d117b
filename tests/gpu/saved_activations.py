"""What the fast path saves for backward, per token and layer, by the call that saved it.

    python tests/gpu/saved_activations.py MODEL [--layers 2]        (GPU: bf16, the real kernels)
    TRITON_INTERPRET=1 python tests/gpu/saved_activations.py MODEL  (CPU: fp32, Triton interpreter)

Builds the bench's configuration of MODEL with ``--layers`` layers (real widths), LoRA r=32, and runs
one training forward twice (8 and 24 Debian texts) under ``saved_tensors_hooks``: each saved storage
is counted once, parameters are left out, and the difference between the two runs divided by the
token difference is the marginal number of values saved per token per layer, grouped by the fastst
source line that saved it. Activation memory of a step is about that total x layers x tokens x the
element size; what exceeds it at the peak is the optimizer, the weights and transients.

Measured on the CPU (fp32, interpreter; 2026-11-29), EmbeddingGemma-300m: ~16k values per token per
layer, of which LoRA inputs 3.7k, plain RMSNorm inputs 2.3k, GeGLU inputs 2.3k, q/k-norm+RoPE inputs
1.3k, residual sums 0.8k, and attention 4.1k + 1.3k for the CPU reference's padded SDPA (the GPU's
varlen kernel saves q, k, v, o and the log-sum-exp: ~2k). Recomputing a norm's output inside the
LoRA node that follows it (input and pre-feed-forward norms) and the GeGLU output inside the down
projection would drop ~2.7k (~20 %). Qwen3-Embedding-0.6B: LoRA inputs 7.4k, SwiGLU inputs 6.1k,
q/k-norm+RoPE inputs 4.1k (while attention saves the rotated q and k again), norms 2k, attention
(GPU) ~6k: ~24k values, i.e. ~8 GB of bf16 activations for 64 Debian pairs (peak measured 11.5 GB;
issue #6 asks <= 8 GB). Recomputing the GLU output (3k), the norm outputs (2k) and the rotated q/k
from the saved pre-norm ones inside the attention backward (3k) would cut ~35 %.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, os.getcwd())
    from fastst_plugin import enable_fast
    from fastst_plugin.bench import data, models

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    spec = models.resolve_model(args.model)
    spec.config["num_hidden_layers"] = args.layers
    if spec.config.get("layer_types"):
        spec.config["layer_types"] = spec.config["layer_types"][: args.layers]
    built = models.build_model(spec, max_seq_length=64, device="cuda" if cuda else "cpu",
                               dtype=torch.bfloat16 if cuda else torch.float32)
    model = built.model
    enable_fast(model, lora={"r": 32}, kernels="triton", cuda_graphs=False)
    model.train()
    pairs = data.load_pairs()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def measure(n):
        feats = model.preprocess(pairs.queries[:n] + pairs.documents[:n])
        feats = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
        seen, sites = set(), collections.Counter()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or ptr in params:
                return t
            seen.add(ptr)
            site = "?"
            for fr in reversed(traceback.extract_stack()[:-1]):
                if "/fastst_plugin/" in fr.filename and "checkpointing" not in fr.filename:
                    site = f"{os.path.basename(fr.filename)}:{fr.lineno} {fr.line.strip()[:70]}"
                    break
            sites[(site, str(t.dtype).replace("torch.", ""))] += t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(feats)["sentence_embedding"]
        return int(feats["attention_mask"].sum()), sites

    t1, s1 = measure(4)
    t2, s2 = measure(12)
    print(f"{args.model}: marginal values saved per token per layer ({t1} vs {t2} tokens, {args.layers} layers)")
    total = 0.0
    for k in sorted(set(s1) | set(s2), key=lambda k: -(s2[k] - s1[k])):
        v = (s2[k] - s1[k]) / (t2 - t1) / args.layers
        total += v
        if abs(v) >= 1:
            print(f"  {v:8.0f}  {k[1]:8s} {k[0]}")
    print(f"  total {total:.0f} values per token per layer")


if __name__ == "__main__":
    main()
