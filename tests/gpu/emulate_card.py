"""Run a `fastst bench` command as if the GPU had less memory (an 80 GB H100 on an H200).

    python tests/gpu/emulate_card.py --gib 79 -- train --models embeddinggemma-300m ...

Before the bench starts, a ballast tensor takes everything above ``--gib`` of the card's total, so
``torch.cuda.mem_get_info`` (what fastst's large-graph headroom rule reads) and the allocator see
the smaller card. The issues' numbers are set for an H100 (80 GB; ~79 GiB usable); the device tool
lends H200s (141 GB), where the rule never binds on the 1024-token cells. What it cannot emulate:
the H100's lower bandwidth and clocks — times stay H200 times; only which buckets get a graph and
the peaks follow the smaller card.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=79.0, help="memory the emulated card has (GiB)")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the fastst bench arguments")
    args = ap.parse_args()
    bench_args = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    free, total = torch.cuda.mem_get_info()
    ballast_bytes = int(total - args.gib * 2**30)
    ballast = None
    if ballast_bytes > 0:
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device="cuda")  # noqa: F841 - held for the run
    free_after, _ = torch.cuda.mem_get_info()
    print(f"[emulate_card] total {total / 2**30:.1f} GiB, ballast {max(ballast_bytes, 0) / 2**30:.1f} GiB, "
          f"free {free / 2**30:.1f} -> {free_after / 2**30:.1f} GiB", flush=True)
    from fastst_plugin.bench import main as bench_main

    return int(bench_main(bench_args) or 0)


if __name__ == "__main__":
    sys.exit(main())
