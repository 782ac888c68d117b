"""A few training steps under ``torch.profiler``, summarised as text (GPU time lines, host waits).

Used by ``fastst_plugin.bench.ddp`` (``FASTST_DDP_TRACE=PREFIX``) to find where a step's wall time
goes when it is neither all GPU work nor all host launch time: the share of the window in which
the GPU runs a kernel, the kernels that take the time, the longest idle gaps, and every host call
that waits for the GPU (stream/device/event synchronisation, blocking copies) with the Python stack
that made it. A trace that the summary cannot explain is written beside it (Chrome format, gzip).
"""

from __future__ import annotations

import gzip
import os
import shutil

_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ", "cudaMemcpy")


class StepTrace:
    """Starts ``torch.profiler`` at the end of step ``first_step`` and stops ``steps`` steps later."""

    def __init__(self, first_step: int, steps: int, out: str):
        self.first_step, self.steps, self.out = first_step, steps, out
        self.prof = None

    def on_step_end(self, step: int) -> None:
        import torch

        if step == self.first_step and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.prof = torch.profiler.profile(activities=acts, with_stack=True, record_shapes=False)
            self.prof.__enter__()
        elif self.prof is not None and step == self.first_step + self.steps:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            try:
                self._write()
            finally:
                self.prof = None

    def _write(self) -> None:
        events = list(self.prof.events())
        kernels = [e for e in events if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
        lines = [f"# {os.path.basename(self.out)}: {self.steps} steps"]
        if kernels:
            spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
            t0, t1 = spans[0][0], max(end for _, end in spans)
            busy, cur_s, cur_e, gaps = 0.0, spans[0][0], spans[0][1], []
            for s, e in spans[1:]:
                if s > cur_e:
                    busy += cur_e - cur_s
                    gaps.append((s - cur_e, cur_e))
                    cur_s, cur_e = s, e
                else:
                    cur_e = max(cur_e, e)
            busy += cur_e - cur_s
            window = t1 - t0
            lines.append(f"GPU window {window / 1000:.2f} ms over {self.steps} steps ({window / 1000 / self.steps:.2f} ms/step); "
                         f"kernels busy {100 * busy / window:.1f}%; {len(kernels)} kernels")
            by_name: dict[str, list[float]] = {}
            for e in kernels:
                v = by_name.setdefault(e.name[:90], [0.0, 0])
                v[0] += e.time_range.end - e.time_range.start
                v[1] += 1
            lines.append("\n## top kernels (ms per step, count per step)")
            for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]:
                lines.append(f"{us / 1000 / self.steps:8.3f} ms {n / self.steps:7.1f}x  {name}")
            lines.append("\n## longest GPU idle gaps (ms, at ms from the window start) and the host ops running then")
            cpu = [e for e in events if e.device_type.name == "CPU"]
            for gap, at in sorted(gaps, reverse=True)[:12]:
                during = [e for e in cpu if e.time_range.start <= at + gap / 2 <= e.time_range.end]
                during.sort(key=lambda e: e.time_range.end - e.time_range.start)
                names = " < ".join(e.name[:50] for e in during[:4])
                lines.append(f"{gap / 1000:8.3f} ms at {(at - t0) / 1000:9.2f}: {names}")
        lines.append("\n## host waits for the GPU (> 0.1 ms)")
        for e in events:
            if e.device_type.name == "CPU" and e.name.startswith(_WAITS):
                dur = (e.time_range.end - e.time_range.start) / 1000
                if dur > 0.1:
                    stack = [f for f in (e.stack or []) if "site-packages/torch/" not in f][:6]
                    lines.append(f"{dur:8.3f} ms {e.name}: " + " | ".join(stack))
        with open(self.out + ".txt", "w") as fh:
            fh.write("\n".join(lines) + "\n")
        raw = self.out + ".trace.json"
        self.prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(raw + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
