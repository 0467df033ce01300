"""The benchmark suite's output beside results.json: a plain-text table per scenario and PNG plots of cost against
context length (reorganisation, decode attention).  matplotlib loads when plotting."""

from __future__ import annotations

from pathlib import Path

__all__ = ["print_tables", "plot"]


def print_tables(results: dict) -> None:
    for key, scenario in results["scenarios"].items():
        print(f"\n## {key}: {scenario['title']}  (baseline: {scenario['baseline']})")
        if "error" in scenario:
            print(f"  failed: {scenario['error']}")
            continue
        if "skipped" in scenario:
            print(f"  skipped: {scenario['skipped']}")
            continue
        rows = scenario["rows"]
        cols = list(dict.fromkeys(c for row in rows for c in row))
        cells = [[_fmt(c, row.get(c)) for c in cols] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in cells:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))


def _fmt(column: str, value) -> str:
    if value is None:
        return "-"
    if column.endswith("_s"):
        return f"{value * 1e3:.3f} ms"
    if column == "ratio":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _save(fig, ax, path: Path) -> str:
    """Legend, layout, PNG; returns the file name."""
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path.name


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    reorg = results["scenarios"].get("1_reorganisation", {}).get("rows")
    if reorg:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for op in dict.fromkeys(r["op"] for r in reorg):
            pts = [r for r in reorg if r["op"] == op]
            ax.plot([r["tokens"] for r in pts], [r["gauge_s"] * 1e3 for r in pts], "o-", label=f"{op} (gauge)")
            ax.plot([r["tokens"] for r in pts], [r["baseline_s"] * 1e3 for r in pts], "x--", label=f"{op} (baseline)")
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per operation",
               title="Cache reorganisation cost")
        written.append(_save(fig, ax, out / "reorganisation.png"))
    decode = [r for r in results["scenarios"].get("6_decode_attention", {}).get("rows", []) if "32/8" in r["shape"]]
    if decode:
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in dict.fromkeys(r["table"] for r in decode):
            pts = [r for r in decode if r["table"] == kind]
            ax.plot([r["tokens"] for r in pts], [r["gauge_s"] * 1e3 for r in pts], "o-", label=f"gauge, {kind}")
            ax.plot([r["tokens"] for r in pts], [r["torch_loop_s"] * 1e3 for r in pts], ":",
                    label=f"torch loop, {kind}")
        pts = [r for r in decode if r["table"] == "contiguous"]
        ax.plot([r["tokens"] for r in pts], [r["baseline_s"] * 1e3 for r in pts], "x--", color="k", label="read floor")
        ax.plot([r["tokens"] for r in pts], [r["sdpa_contiguous_s"] * 1e3 for r in pts], "s-.",
                label="SDPA, contiguous")
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="ms per call (32/8 heads, d 128)",
               title="Decode attention")
        written.append(_save(fig, ax, out / "decode_attention.png"))
    plt.close("all")
    return written

