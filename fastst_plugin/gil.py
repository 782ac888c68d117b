"""A short GIL switch interval while fastst's background threads run beside the GPU thread.

Python's default switch interval is 5 ms. Every torch call on the thread that feeds the GPU releases
and re-takes the GIL; while a background thread (encode's packing thread, the trainer's batch
prefetch thread) runs Python, each re-take waited up to the full interval (measured on an H200 host,
MiniLM encode: a batch's launch took 7.6 ms while a chunk was being packed, 1.1 ms after).
"""

from __future__ import annotations

import contextlib
import sys
import threading

GIL_SWITCH_INTERVAL = 2e-4
_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.005


@contextlib.contextmanager
def prompt_gil_handoff():
    """Switch interval ``GIL_SWITCH_INTERVAL`` for the duration of the block (process-wide, so
    counted: the previous interval comes back when the last overlapping block ends)."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, GIL_SWITCH_INTERVAL))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)
