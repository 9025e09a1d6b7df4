"""timeline.png: moves and their convergence latency over time, fault intervals shaded (as
Jepsen's latency plots do), and one lane per fault below."""

from __future__ import annotations

from pathlib import Path

NS = 1_000_000_000
COLORS = {"partition": "#4c72b0", "net": "#dd8452", "kill": "#c44e52", "pause": "#8172b3", "restart": "#937860"}


def fault_intervals(h) -> list[dict]:
    """[{label, kind, start, end}] in seconds since the workload started."""
    out: list[dict] = []
    open_net: list[dict] = []
    open_proc: dict[str, dict] = {}
    end_all = None
    for e in h.events:
        t = h.rel(e["t_ns"])
        if e["ev"] == "fault" and e["phase"] == "inject":
            iv = {"label": e["label"], "kind": "partition" if e["label"].startswith("partition") else "net",
                  "start": t, "end": None}
            out.append(iv)
            open_net.append(iv)
        elif e["ev"] == "fault" and e["phase"] == "heal":
            for iv in open_net:
                iv["end"] = t
            open_net = []
        elif e["ev"] == "heal_all":
            end_all = t
            for iv in open_net:
                iv["end"] = t
            open_net = []
        elif e["ev"] in ("proc", "proc_died"):
            name = e["name"]
            action = e.get("action", "died")
            if action in ("kill", "pause", "died"):
                if e.get("for_restart"):  # a restart: down from this kill until it is ready again
                    iv = {"label": f"restart {name}", "kind": "restart", "start": t, "end": None}
                else:
                    iv = {"label": f"{action} {name}", "kind": "kill" if action != "pause" else "pause",
                          "start": t, "end": None}
                out.append(iv)
                open_proc[name] = iv
            elif action in ("restart", "resume"):
                iv = open_proc.pop(name, None)
                if iv is not None:
                    iv["end"] = t
                elif action == "restart":
                    out.append({"label": f"restart {name}", "kind": "restart", "start": t, "end": t + 0.15})
    last = h.rel(h.events[-1]["t_ns"]) if h.events else 0.0
    for iv in out:
        if iv["end"] is None:
            iv["end"] = end_all if end_all is not None else last
    return out


def draw_timeline(h, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faults = fault_intervals(h)
    conv, late, refused, noreply, wait = [], [], [], [], []
    for rid, req in h.reqs.items():
        x = h.rel(req["t_ns"])
        o = h.outcomes.get(rid)
        if o is not None and o["ev"] == "move_ack":
            wait.append((x, max((o["t_ns"] - req["t_ns"]) / 1e6, 0.01)))
        if o is None or o["ev"] == "move_noreply":
            noreply.append(x)
        elif o["ev"] == "move_refused":
            refused.append(x)
        elif o["rec"].get("converged") and o["rec"].get("latency_ms") is not None:
            conv.append((x, max(o["rec"]["latency_ms"], 0.01)))
        else:
            late.append(x)
    ha = [(h.rel(m["switch_ns"]), m["latency_ms"]) for m in h.ctl_moves
          if m["kind"] == "restart" and m.get("switch_ns") and m["switch_ns"] >= h.t0]
    lats = [y for _, y in conv] + [y for _, y in ha if y] + [y for _, y in wait]
    top = max([*lats, 10.0]) * 4
    bottom = min([*lats, 0.1]) / 4

    n_lanes = max(1, len(faults))
    fig, (ax, lanes) = plt.subplots(2, 1, sharex=True, figsize=(12, 6.5 + 0.18 * n_lanes),
                                    gridspec_kw={"height_ratios": [3, max(1.0, 0.25 * n_lanes)]})
    for iv in faults:
        ax.axvspan(iv["start"], iv["end"], color=COLORS[iv["kind"]], alpha=0.12, lw=0)
    if wait:
        ax.scatter([x for x, _ in wait], [y for _, y in wait], s=22, facecolors="none", edgecolors="#aaaaaa",
                   lw=0.8, label="client wait for the reply", zorder=1)
    if conv:
        ax.scatter([x for x, _ in conv], [y for _, y in conv], s=14, color="#1f77b4", label="converged (latency)")
    if ha:
        ax.scatter([x for x, _ in ha], [y if y else top / 2 for _, y in ha], s=36, marker="^", color="#9467bd",
                   label="HA restart by the controller")
    if late:
        ax.scatter(late, [top / 2] * len(late), s=30, marker="v", color="#ff7f0e",
                   label="switched, not converged in time")
    if refused:
        ax.scatter(refused, [bottom * 2] * len(refused), s=26, marker="x", color="#7f7f7f", label="refused")
    if noreply:
        ax.scatter(noreply, [top / 1.5] * len(noreply), s=40, marker="X", color="#d62728", label="no reply")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_ylabel("ms, at the request time (log)")
    for e in h.events:
        if e["ev"] == "heal_all":
            ax.axvline(h.rel(e["t_ns"]), color="green", ls="--", lw=1)
            lanes.axvline(h.rel(e["t_ns"]), color="green", ls="--", lw=1)
        elif e["ev"] == "settled":
            ax.axvline(h.rel(e["t_ns"]), color="green", lw=1)
            lanes.axvline(h.rel(e["t_ns"]), color="green", lw=1)
    verdict = summary.get("verdict", "?")
    failed = summary.get("failed") or []
    title = f"{summary.get('scenario')} (seed {summary.get('seed')}): {verdict.upper()}"
    if failed:
        title += " - failed: " + ", ".join(failed)
    ax.set_title(title, color={"valid": "green", "invalid": "red"}.get(verdict, "black"))
    ax.grid(True, which="major", alpha=0.3)
    if conv or ha or late or refused or noreply:
        ax.legend(loc="upper left", fontsize=8, ncol=3)

    for i, iv in enumerate(faults):
        lanes.barh(i, iv["end"] - iv["start"], left=iv["start"], color=COLORS[iv["kind"]], alpha=0.7, height=0.7)
        lanes.text(iv["start"], i, " " + iv["label"], va="center", ha="left", fontsize=7)
    lanes.set_yticks([])
    lanes.set_ylim(-0.7, n_lanes - 0.3)
    lanes.invert_yaxis()
    lanes.set_xlabel("seconds since the workload started (dashed: heal everything, solid: settled)")
    lanes.set_ylabel("faults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
