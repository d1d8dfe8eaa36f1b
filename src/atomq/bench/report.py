"""Result files (bench/results.py) -> markdown tables and plots.

The tables need nothing beyond the standard library (the GPU script prints them); the plots need
matplotlib (the ``dev`` extra), imported only when a plot is drawn.

    python -m atomq.bench.report runs/bench-throughput/llama-2-7b.json --plots docs/img --out table.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from .results import load


def _num(x, fmt: str = ",.0f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, fmt)


def _pct(summary: dict | None, scale: float = 1.0, fmt: str = ".3f") -> str:
    """'p50 / p99' of a bench/metrics.summarize dict."""
    if not summary:
        return "-"
    return f"{summary['p50'] * scale:{fmt}} / {summary['p99'] * scale:{fmt}}"


def _rate(rate: float | None) -> str:
    """A request rate in req/s; None (every request at t=0) reads 'inf', as on the command line."""
    return "inf" if rate is None else f"{rate:g}"


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _notes(rows: list[dict], key) -> list[str]:
    return [f"- {key(r)}: {r['status']}: {r['reason']}" for r in rows if r.get("status") != "ok" and r.get("reason")]


def describe_row(r: dict) -> str:
    """One line for progress output."""
    head = f"[{r['status']}] {r.get('model', '-')} {r.get('config', '-')}"
    if "budget" in r:
        head += f" budget {r['budget']}" + (f" max seqs {r['max_num_seqs']}" if r.get("max_num_seqs") else "")
    if "request_rate" in r:
        head += f" at {_rate(r['request_rate'])} req/s"
    if r.get("output_tok_s") is None:
        return f"{head}: {r.get('reason', '')}"
    tail = f", max batch {r['max_running']}" if "max_running" in r else ""
    return f"{head}: {r['output_tok_s']:,.0f} output tok/s, TPOT p50 / p99 {_pct(r.get('tpot_s'), 1e3, '.1f')} ms{tail}"


def throughput_table(rows: list[dict]) -> str:
    """One line per run; runs that did not measure (does not fit, out of memory, error) show '-' and are
    explained in a list under the table."""
    head = ("| model | config | budget | max seqs | status | output tok/s | total tok/s | TTFT p50 / p99 (s) "
            "| TPOT p50 / p99 (ms) | max batch | KV tokens (budget / pool) | weights (GB) | peak (GB) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        kv = f"{_num(r.get('kv_budget_tokens'))} / {_num(r.get('kv_capacity_tokens'))}"
        lines.append(" | ".join([
            f"| {r['model']}", r["config"], r["budget"], _num(r.get("max_num_seqs")), r["status"],
            _num(r.get("output_tok_s")), _num(r.get("total_tok_s")), _pct(r.get("ttft_s")),
            _pct(r.get("tpot_s"), 1e3, ".1f"), _num(r.get("max_running")), kv, _gb(r.get("weight_bytes")),
            _gb(r.get("peak_memory_bytes")) + " |"]))
    notes = _notes(rows, lambda r: f"{r['model']} {r['config']} {r['budget']}"
                   + (f" max seqs {r['max_num_seqs']}" if r.get("max_num_seqs") else ""))
    return "\n".join(lines + ([""] + notes if notes else []))


def serving_table(rows: list[dict]) -> str:
    head = ("| model | config | rate (req/s) | status | completed | duration (s) | output tok/s "
            "| TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | E2E p50 / p99 (s) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(" | ".join([
            f"| {r.get('model', '-')}", r.get("config", "-"), _rate(r.get("request_rate")), r["status"],
            f"{r.get('completed', 0)} / {r.get('num_requests', 0)}", _num(r.get("duration_s"), ".1f"),
            _num(r.get("output_tok_s")), _pct(r.get("ttft_s")), _pct(r.get("tpot_s"), 1e3, ".1f"),
            _pct(r.get("e2e_s"), 1.0, ".2f") + " |"]))
    notes = _notes(rows, lambda r: f"{r.get('config', '-')} at {_rate(r.get('request_rate'))} req/s")
    return "\n".join(lines + ([""] + notes if notes else []))


def render(data: dict) -> str:
    """A result file as markdown: where it was measured, the workload, the table."""
    env = data.get("env") or {}
    out = [f"Measured on {env.get('device', '?')} ({', '.join(f'{k} {v}' for k, v in env.items() if k != 'device')})."]
    wl = data.get("workload")
    if wl:
        out.append(f"Workload: {wl['num_requests']} requests, {wl['description']}.")
    out.append("")
    table = throughput_table if data["kind"] == "throughput" else serving_table
    out.append(table(data["rows"]))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- plots
def _grid(rows: list[dict], col_key: str | None):
    """Measured rows grouped: {(model, row[col_key] or None): {config: [rows]}}, plus the models and the
    column values in order of appearance."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("status") == "ok":
            groups[(r["model"], r.get(col_key) if col_key else None)][r["config"]].append(r)
    models = list(dict.fromkeys(k[0] for k in groups))
    cols = list(dict.fromkeys(k[1] for k in groups))
    return groups, models, cols


def _colors(rows: list[dict]) -> dict[str, str]:
    """One color per configuration, the same in every panel (order of first appearance)."""
    return {cfg: f"C{i}" for i, cfg in enumerate(dict.fromkeys(r.get("config") for r in rows))}


def _figure(models: list, cols: list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(cols), figsize=(5.2 * len(cols), 3.8 * len(models)), squeeze=False)
    return plt, fig, axes


def plot_throughput_vs_batch(rows: list[dict], path: str | Path) -> Path | None:
    """Output tok/s against the mean running batch (sequences, time-weighted over steps), one line per
    configuration, one panel per (model, budget). Returns the file written (None: nothing measured)."""
    groups, models, cols = _grid(rows, "budget")
    if not groups:
        return None
    color = _colors(rows)
    plt, fig, axes = _figure(models, cols)
    for i, m in enumerate(models):
        for j, b in enumerate(cols):
            ax = axes[i][j]
            for cfg, rs in groups.get((m, b), {}).items():
                rs = sorted(rs, key=lambda r: r["mean_running"])
                ax.plot([r["mean_running"] for r in rs], [r["output_tok_s"] for r in rs], marker="o", color=color[cfg],
                        label=cfg)
            ax.set(title=f"{m}, budget {b}", xlabel="mean running batch (sequences)", ylabel="output tok/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_latency_vs_throughput(rows: list[dict], path: str | Path) -> Path | None:
    """TPOT p50 (solid) and p99 (dashed) in ms against output tok/s, one line per configuration, one panel
    per (model, budget); the points are the max_num_seqs sweep."""
    groups, models, cols = _grid(rows, "budget")
    if not groups:
        return None
    color = _colors(rows)
    plt, fig, axes = _figure(models, cols)
    for i, m in enumerate(models):
        for j, b in enumerate(cols):
            ax = axes[i][j]
            for cfg, rs in groups.get((m, b), {}).items():
                rs = sorted((r for r in rs if r.get("tpot_s")), key=lambda r: r["output_tok_s"])
                x = [r["output_tok_s"] for r in rs]
                for pct, style in (("p50", dict(marker="o")), ("p99", dict(ls="--"))):
                    ax.plot(x, [r["tpot_s"][pct] * 1e3 for r in rs], color=color[cfg], label=f"{cfg} {pct}", **style)
            ax.set(title=f"{m}, budget {b}", xlabel="output tok/s", ylabel="time per output token (ms)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_serving_latency(rows: list[dict], path: str | Path) -> Path | None:
    """TTFT and TPOT p50 / p99 against the request rate, one line per configuration (rows sent all at
    once, request_rate None, have no place on that axis: they are in the table)."""
    groups, models, _ = _grid(rows, None)
    if not groups:
        return None
    color = _colors(rows)
    plt, fig, axes = _figure(models, ["ttft", "tpot"])
    for i, m in enumerate(models):
        for j, (key, unit, scale) in enumerate((("ttft_s", "s", 1.0), ("tpot_s", "ms", 1e3))):
            ax = axes[i][j]
            for cfg, rs in groups.get((m, None), {}).items():
                rs = sorted((r for r in rs if r.get(key) and r.get("request_rate") is not None),
                            key=lambda r: r["request_rate"])
                x = [r["request_rate"] for r in rs]
                for pct, style in (("p50", dict(marker="o")), ("p99", dict(ls="--"))):
                    ax.plot(x, [r[key][pct] * scale for r in rs], color=color[cfg], label=f"{cfg} {pct}", **style)
            name = key.removesuffix("_s").upper()
            ax.set(title=f"{m}: {name}", xlabel="request rate (req/s)", ylabel=f"{name} ({unit})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(data: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """The plots of one result file into out_dir as <stem>-<plot>.png; returns the files written."""
    out_dir = Path(out_dir)
    if data["kind"] == "throughput":
        made = [plot_throughput_vs_batch(data["rows"], out_dir / f"{stem}-throughput-vs-batch.png"),
                plot_latency_vs_throughput(data["rows"], out_dir / f"{stem}-latency-vs-throughput.png")]
    else:
        made = [plot_serving_latency(data["rows"], out_dir / f"{stem}-latency-vs-rate.png")]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atomq.bench.report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="result JSON files (atomq bench throughput / serving --out)")
    p.add_argument("--plots", default=None, help="directory for the PNG plots (needs matplotlib)")
    p.add_argument("--out", default=None, help="write the markdown here as well as printing it")
    ns = p.parse_args(argv)
    parts = []
    for f in ns.results:
        data = load(f)
        parts.append(f"### {Path(f).stem}\n\n{render(data)}")
        if ns.plots:
            for made in write_plots(data, ns.plots, Path(f).stem):
                parts.append(f"\n![{made.stem}]({made})")
    text = "\n\n".join(parts) + "\n"
    print(text)
    if ns.out:
        Path(ns.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
