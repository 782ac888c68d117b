"""Where a training cell's peak memory goes, contender by contender (run on the GPU machine).

    python tests/gpu/memory_breakdown.py [--models minilm,bert-base] [--mode lora] [--max-seq-length 256]

Each contender is built alone (the others freed first) exactly as ``fastst bench train`` builds it,
and device memory is read after the build, after the first step and after a few more; peaks are the
allocator's high-water marks since just before the build (what the bench reports). fastst runs with
CUDA graphs on and off. The largest live blocks after the steps are listed from the allocator's
snapshot (what holds memory between steps: weights, optimizer state, graph pools). Writes
$OUT/memory-breakdown.txt.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys

import torch

GB = 1e9


def _blocks_summary(top: int = 12) -> str:
    segs = torch.cuda.memory_snapshot()
    active = []
    for s in segs:
        for b in s.get("blocks", []):
            if b.get("state") == "active_allocated":
                active.append((b["size"], s.get("segment_pool_id"), s.get("segment_type")))
    active.sort(reverse=True)
    total = sum(a[0] for a in active)
    by_pool: dict = {}
    for size, pool, _ in active:
        by_pool[str(pool)] = by_pool.get(str(pool), 0) + size
    lines = [f"  live blocks {len(active)}, {total / GB:.3f} GB; by pool: " + ", ".join(f"{k}: {v / GB:.3f}" for k, v in by_pool.items())]
    lines.append("  largest: " + ", ".join(f"{s / 1e6:.1f} MB" for s, _, _ in active[:top]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--mode", default="lora")
    ap.add_argument("--max-seq-length", default="256")
    ap.add_argument("--batch-size", default="64")
    args = ap.parse_args()

    from fastst_plugin.bench import _finalize, _quiet_libraries, build_parser
    from fastst_plugin.bench.contenders import build_contender, train_step
    from fastst_plugin.bench.runner import load_data, make_cell

    out = io.StringIO()
    for key in args.models.split(","):
        for name, fopts in (("stock", []), ("fastst", []), ("fastst", ["--fastst-opt", "cuda_graphs=false"])):
            opts = build_parser().parse_args(
                ["train", "--models", key, "--mode", args.mode, "--contenders", name, "--no-dropout",
                 "--max-seq-length", args.max_seq_length, "--batch-size", args.batch_size, "--steps", "10", *fopts]
            )
            opts.argv = []
            _finalize(opts)
            _quiet_libraries()
            cell = make_cell(opts, key, opts.max_seq_length[0], opts.batch_size[0], load_data(opts))
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run = build_contender(name, cell)
            if run.error:
                print(f"{key} {name}: build failed: {run.error}", file=out)
                continue
            rows = [("built", torch.cuda.memory_allocated())]
            peak_build = torch.cuda.max_memory_allocated()
            # the heaviest batch first, as the bench's warm-up does
            for i in range(6):
                train_step(run)
                torch.cuda.synchronize()
                if i in (0, 1, 5):
                    rows.append((f"after step {i + 1}", torch.cuda.memory_allocated()))
            peak = torch.cuda.max_memory_allocated()
            label = f"{key} {args.mode} {name}{' ' + ' '.join(fopts[1:]) if fopts else ''}"
            print(f"{label}: peak {(peak - base) / GB:.3f} GB (build peak {(peak_build - base) / GB:.3f}); "
                  + "; ".join(f"{s} {(m - base) / GB:.3f}" for s, m in rows), file=out)
            opt_state = sum(t.numel() * t.element_size() for st in run.optimizer.state.values() for t in st.values() if torch.is_tensor(t))
            params = sum(p.numel() * p.element_size() for p in run.built.model.parameters())
            print(f"  params {params / GB:.3f} GB, optimizer state {opt_state / GB:.3f} GB, "
                  f"reserved {torch.cuda.memory_reserved() / GB:.3f} GB", file=out)
            print(_blocks_summary(), file=out)
            print(out.getvalue().splitlines()[-3], flush=True)
            run.free()
            del run
    text = out.getvalue()
    print(text)
    with open(os.path.join(os.environ.get("OUT", "."), "memory-breakdown.txt"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
