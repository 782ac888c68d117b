"""Table (markdown, also printed) and chart (PNG) from the JSON-lines results."""

from __future__ import annotations

import os

CONTENDER_ORDER = ("stock", "flat", "unsloth", "fastst")
SHORT = {
    "minilm": "MiniLM-L6",
    "bert-base": "bert-base",
    "modernbert-base": "ModernBERT",
    "embeddinggemma-300m": "EmbGemma-300m",
    "qwen3-0.6b": "Qwen3-0.6B",
    "qwen3-4b": "Qwen3-4B",
}
COLORS = {"stock": "#8c8c8c", "flat": "#4c72b0", "unsloth": "#dd8452", "fastst": "#2ca02c"}

COLUMNS = [
    ("model", "model"),
    ("max_seq_len", "max_seq_len"),
    ("mode", "mode"),
    ("contender", "contender"),
    ("real tok/s", "tokens_per_s"),
    ("pairs/s", "pairs_per_s"),
    ("vs stock", "speedup_vs_stock"),
    ("vs flat", "speedup_vs_flat"),
    ("MFU %", "mfu"),
    ("peak alloc GB", "peak_alloc_gb"),
    ("peak reserved GB", "peak_reserved_gb"),
    ("pad %", "pad_fraction"),
    ("GPU busy %", "gpu_busy"),
    ("final loss", "loss_final"),
    ("step ms", "step_ms"),
]


def _fmt(key: str, rec: dict) -> str:
    v = rec.get(key)
    if key == "loss_final" and rec.get("workload") == "encode":
        a = rec.get("agreement")
        if a is None:
            return "–"
        return f"Δ={a:.2g}" if rec.get("api") == "predict" else f"cos={a:.4f}"
    if key == "mode" and rec.get("workload") == "encode":
        return rec.get("api", "encode")
    if v is None:
        return "–"
    if key in ("mfu", "pad_fraction", "gpu_busy"):
        return f"{100 * v:.1f}"
    if key in ("speedup_vs_stock", "speedup_vs_flat"):
        return f"{v:.2f}×"
    if key == "tokens_per_s":
        return f"{v:,.0f}"
    if key == "pairs_per_s":
        return f"{v:,.1f}"
    if key in ("peak_alloc_gb", "peak_reserved_gb"):
        return f"{v:.2f}"
    if key == "loss_final":
        return f"{v:.4f}"
    if key == "step_ms":
        return f"{v:.1f}"
    return str(v)


def _model_rank(name: str) -> tuple[int, str]:
    from .models import ALL_MODELS

    return (ALL_MODELS.index(name), "") if name in ALL_MODELS else (len(ALL_MODELS), name)


def _sort_key(r: dict):
    c = r.get("contender", "")
    return (
        r.get("workload", ""),
        _model_rank(r.get("model", "")),
        r.get("max_seq_len", 0),
        r.get("batch_size", 0),
        str(r.get("mode")),
        str(r.get("api")),
        CONTENDER_ORDER.index(c) if c in CONTENDER_ORDER else 9,
    )


def results(records: list[dict]) -> list[dict]:
    return sorted((r for r in records if r.get("record") == "result"), key=_sort_key)


def markdown_table(records: list[dict]) -> str:
    rows = results(records)
    multi_batch = len({r.get("batch_size") for r in rows}) > 1
    cols = list(COLUMNS)
    if multi_batch:
        cols.insert(2, ("batch", "batch_size"))
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    sep = "|" + "|".join("---" if i < 4 else "---:" for i, _ in enumerate(cols)) + "|"
    lines = [head, sep]
    notes: list[str] = []
    for r in rows:
        if r.get("status") != "ok":
            cells = [_fmt(k, r) if k in ("model", "max_seq_len", "mode", "contender", "batch_size") else "" for _, k in cols]
            cells[4 if not multi_batch else 5] = f"{r.get('status')}: {(r.get('error') or '')[:90]}"
            lines.append("| " + " | ".join(cells) + " |")
            continue
        lines.append("| " + " | ".join(_fmt(k, r) for _, k in cols) + " |")
        for n in r.get("notes") or []:
            msg = f"{r['model']} L={r['max_seq_len']} {r['contender']}: {n}"
            if msg not in notes:
                notes.append(msg)
    cold: dict = {}
    for r in rows:  # encode: the first, untimed whole-corpus pass (graph capture and other one-offs)
        if r.get("status") == "ok" and r.get("first_pass_ms") is not None:
            cold.setdefault((r["model"], r["max_seq_len"], _fmt("mode", r)), []).append(f"{r['contender']} {r['first_pass_ms']:.0f}")
    notes += [f"{m} L={length} {mode}: first (untimed, cold) pass ms: {', '.join(v)}" for (m, length, mode), v in cold.items()]
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def header_text(env: dict | None, sep: str = "; ") -> str:
    if not env:
        return ""
    v = env.get("versions", {})
    card = [
        f"card: {env.get('gpu') or env.get('device')}",
        f"peak bf16 matmul: {env['peak_tflops']:.0f} TFLOP/s" if env.get("peak_tflops") else None,
        f"date: {env.get('date')}",
    ]
    libs = [
        "torch " + str(v.get("torch")),
        "transformers " + str(v.get("transformers")),
        "sentence-transformers " + str(v.get("sentence-transformers")),
        "peft " + str(v.get("peft")),
        ("flash-attn " + str(v.get("flash-attn"))) if v.get("flash-attn") else None,
        ("unsloth " + str(v.get("unsloth"))) if v.get("unsloth") else None,
    ]
    return "; ".join(p for p in card if p) + sep + "; ".join(p for p in libs if p)


def write_table(path: str, records: list[dict], env: dict | None, command: str | None = None) -> str:
    text = ""
    if env:
        text += header_text(env) + "\n\n"
    if command:
        text += f"`{command}`\n\n"
    text += markdown_table(records) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def write_chart(path: str, records: list[dict], env: dict | None = None) -> bool:
    """Two panels: real-token throughput relative to stock, and peak allocated memory, per model and
    length (one bar per contender). Returns False when there is nothing to draw or no matplotlib."""
    rows = [r for r in results(records) if r.get("status") == "ok"]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False

    groups: list[tuple] = []
    for r in rows:
        g = (r["workload"], r["model"], r["max_seq_len"], r.get("batch_size"), r.get("mode") if r["workload"] == "train" else r.get("api"))
        if g not in groups:
            groups.append(g)
    contenders = [c for c in CONTENDER_ORDER if any(r["contender"] == c for r in rows)]
    contenders += sorted({r["contender"] for r in rows} - set(contenders))
    index = {(g, c): None for g in groups for c in contenders}
    for r in rows:
        g = (r["workload"], r["model"], r["max_seq_len"], r.get("batch_size"), r.get("mode") if r["workload"] == "train" else r.get("api"))
        index[(g, r["contender"])] = r

    multi_batch = len({g[3] for g in groups}) > 1
    multi_mode = len({g[4] for g in groups}) > 1
    labels = [
        f"{SHORT.get(g[1], g[1])}\nL={g[2]}" + (f" B={g[3]}" if multi_batch else "") + (f"\n{g[4]}" if multi_mode else "")
        for g in groups
    ]
    width = 0.8 / max(1, len(contenders))
    fig_w = min(20.0, max(8.0, 0.3 * len(groups) * max(1, len(contenders)) + 3))
    fig, axes = plt.subplots(2, 1, figsize=(fig_w, 8.5), sharex=True)
    xs = list(range(len(groups)))
    for ci, c in enumerate(contenders):
        sp, mem, res = [], [], []
        for g in groups:
            r = index[(g, c)]
            sp.append(r.get("speedup_vs_stock") if r else None)
            mem.append(r.get("peak_alloc_gb") if r else None)
            res.append(r.get("peak_reserved_gb") if r else None)
        pos = [x - 0.4 + width * (ci + 0.5) for x in xs]
        rx = [p for p, v in zip(pos, res) if v is not None]
        rv = [v for v in res if v is not None]
        if rv:  # reserved (the allocator's cache included): an outline behind the allocated bar
            axes[1].bar(rx, rv, width * 0.95, fill=False, edgecolor=COLORS.get(c, "black"), lw=1.0, ls="--")
        for ax, vals, fmt in ((axes[0], sp, "{:.2f}×"), (axes[1], mem, "{:.1f}")):
            px = [p for p, v in zip(pos, vals) if v is not None]
            pv = [v for v in vals if v is not None]
            if not pv:
                continue
            bars = ax.bar(px, pv, width * 0.95, label=c, color=COLORS.get(c))
            for b, v in zip(bars, pv):
                ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    axes[0].axhline(1.0, color="black", lw=0.8, ls="--")
    axes[0].set_ylabel("real tokens/s vs stock (×)")
    axes[1].set_ylabel("peak GPU memory (GB)\nfilled: allocated, dashed: reserved")
    wl = rows[0]["workload"]
    modes = sorted({str(r.get("mode")) for r in rows})
    desc = (
        f"train: {'/'.join(modes)} "
        + (f"r={rows[0].get('lora_r')} " if rows[0].get("lora_r") else "")
        + f"{rows[0].get('loss')}, batch {rows[0].get('batch_size')} pairs"
        if wl == "train"
        else f"encode: {rows[0].get('api')}, batch {rows[0].get('batch_size')}"
    )
    title = f"fastst bench — {desc}"
    if env:
        title += "\n" + header_text(env, sep="\n")
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=8, ncol=len(contenders), loc="upper left")
    for ax in axes:
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 1.15)
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(labels, fontsize=8)
    if all(index[(g, c)] is None or index[(g, c)].get("peak_alloc_gb") is None for g in groups for c in contenders):
        axes[1].text(0.5, 0.5, "no GPU memory figures (CPU run)", ha="center", va="center", transform=axes[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render(out_dir: str, records: list[dict], command: str | None = None) -> str:
    env = next((r for r in reversed(records) if r.get("record") == "env"), None)
    text = write_table(os.path.join(out_dir, "table.md"), records, env, command)
    write_chart(os.path.join(out_dir, "chart.png"), records, env)
    return text
