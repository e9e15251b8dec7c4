"""Text and PNG renderings of an analyze report (strings and files; the CLI prints them)."""

from __future__ import annotations

from pathlib import Path

from maia_onnx.extras import require
from maia_onnx.io import atomic_write
from maia_onnx.report import format_table, human_bytes


def _ms(seconds: float) -> float:
    return seconds * 1e3


def render_text(report: dict, top: int = 15) -> str:
    """The terminal report: per phase, the top ops, op types, every configuration and the best one."""
    dev = report["device"]
    peaks = ", ".join(f"{k} {v / 1e12:g} T" for k, v in dev["peak_flops"].items())
    lines = [
        f"model: {report['model']}" + (f"  (partition tp={report['tp']} pp={report['pp']})" if report["kind"] == "partition" else ""),
        f"device: {dev['name']}  peak FLOP/s {peaks}; {dev['memory_bandwidth'] / 1e12:g} TB/s; "
        f"{human_bytes(dev['memory_capacity'])} (limit {human_bytes(report['memory_limit'])})",
        "interconnects: " + ", ".join(f"{i['name']} ({i['bandwidth'] / 1e9:g} GB/s, alpha {i['alpha'] * 1e6:g} us)"
                                      for i in report["interconnects"]),
    ]
    for phase, s in report["phases"].items():
        lines.append("")
        lines.append(f"== {phase}: batch {s['batch']}, seq {s['seq']}, past {s['past']} ==")
        mem_share = s["memory_bound_time_s"] / s["time_s"] if s["time_s"] else 0.0
        lines.append(
            f"single device: {s['flops'] / 1e9:.4g} GFLOP, {human_bytes(s['bytes'])} moved, intensity "
            f"{s['intensity']:.3g} FLOP/B, roofline {_ms(s['time_s']):.4g} ms ({mem_share:.0%} of it memory-bound); "
            f"weights {human_bytes(s['weight_bytes'])}, KV cache {human_bytes(s['kv_cache_bytes'])}"
        )
        ops = sorted(s["ops"], key=lambda r: -r["time_s"])[:top]
        rows = [{**r, "time_us": r["time_s"] * 1e6, "GFLOP": r["flops"] / 1e9, "MB": r["bytes"] / 1e6} for r in ops]
        lines.append(format_table(rows, ["name", "op_type", "dtype", "GFLOP", "MB", "intensity", "time_us", "bound"],
                                  title=f"top {len(rows)} ops by roofline time"))
        types = [{"op_type": k, **v, "time_us": v["time_s"] * 1e6, "GFLOP": v["flops"] / 1e9, "MB": v["bytes"] / 1e6}
                 for k, v in list(s["by_op_type"].items())[:top]]
        lines.append(format_table(types, ["op_type", "count", "GFLOP", "MB", "time_us"], title="by op type"))
        cfgs = [{**c, "compute_ms": _ms(c["compute_s"]), "comm_ms": _ms(c["comm_s"]), "bubble_ms": _ms(c["bubble_s"]),
                 "total_ms": _ms(c["total_s"]), "coll_MB": c["collective_bytes"] / 1e6,
                 "p2p_ms": _ms(c.get("p2p_s", 0.0)), "p2p_MB": c.get("p2p_bytes", 0.0) / 1e6,
                 "mem_GB": c["memory_bytes"] / 1e9, "fits": "yes" if c["fits"] else "NO",
                 "m": c["microbatches"]} for c in s["configs"]]
        lines.append(format_table(cfgs, ["interconnect", "tp", "pp", "m", "compute_ms", "comm_ms", "p2p_ms", "p2p_MB",
                                         "bubble_ms", "total_ms", "collectives", "coll_MB", "mem_GB", "fits", "note"],
                                  title="configurations (time per forward, per rank; comm_ms includes the p2p_ms pipeline sends)"))
        if s.get("ranks"):
            lines.append(format_table(s["ranks"], ["interconnect", "rank", "stage", "compute_s", "comm_s", "p2p_s", "p2p_bytes",
                                                   "collectives", "collective_bytes", "memory_bytes", "fits"], title="ranks"))
        best = s.get("best")
        if best:
            lines.append(f"best: tp={best['tp']} pp={best['pp']} over {best['interconnect']}: {_ms(best['total_s']):.4g} ms "
                         f"per forward, {best['memory_bytes'] / 1e9:.3g} GB per device")
        else:
            lines.append("best: no configuration fits the memory limit: raise --memory-limit, add --tp/--pp degrees or quantize")
    return "\n".join(lines)


def plot_breakdown(report: dict, out_path: str | Path) -> Path:
    """PNG: stacked compute / communication / bubble time against TP degree, one panel per phase x interconnect."""
    require("matplotlib", "plot", "analyze --plot").use("Agg")
    plt = require("matplotlib.pyplot", "plot", "analyze --plot")

    phases = list(report["phases"])
    links = [i["name"] for i in report["interconnects"]]
    fig, axes = plt.subplots(len(phases), len(links), figsize=(4.2 * len(links), 3.6 * len(phases)), squeeze=False)
    colors = {"compute": "#4C72B0", "communication": "#DD8452", "bubble": "#BBBBBB"}
    for row, phase in enumerate(phases):
        configs = report["phases"][phase]["configs"]
        tps = sorted({c["tp"] for c in configs})
        pps = sorted({c["pp"] for c in configs})
        width = 0.8 / len(pps)
        for col, link in enumerate(links):
            ax = axes[row][col]
            ticks, labels = [], []
            for i, tp in enumerate(tps):
                for j, pp in enumerate(pps):
                    match = [c for c in configs if c["interconnect"] == link and c["tp"] == tp and c["pp"] == pp]
                    if not match:
                        continue
                    c = match[0]
                    x = i + (j - (len(pps) - 1) / 2) * width
                    parts = [("compute", c["compute_s"]), ("communication", c["comm_s"]), ("bubble", c["bubble_s"])]
                    bottom = 0.0
                    for label, value in parts:
                        ax.bar(x, _ms(value), width * 0.92, bottom=bottom, color=colors[label],
                               hatch="" if c.get("valid", True) and c["fits"] else "//",
                               label=label if (i == 0 and j == 0) else None)
                        bottom += _ms(value)
                    ticks.append(x)
                    labels.append(f"pp{pp}" if len(pps) > 1 else "")
            ax.set_xticks(ticks)
            ax.set_xticklabels(labels, fontsize=6, rotation=90)
            for i, tp in enumerate(tps):
                ax.annotate(f"TP{tp}", (i, 0), xytext=(0, -26), textcoords="offset points", ha="center",
                            fontsize=8, annotation_clip=False)
            ax.set_title(f"{phase} - {link}", fontsize=9)
            ax.set_ylabel("ms per forward", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    device = report["device"]["name"]
    shown = "/".join(Path(report["model"]).parts[-2:])
    fig.suptitle(f"{shown} on {device}: time per forward vs TP (hatched: does not fit / invalid)",
                 fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_write(out_path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return out_path
