"""What `dvs bench` shows and writes: rich tables, headline and goals, PNG plots, Markdown."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from testbed.bench.stats import ratio

GOAL_P99_RATIO = 2.0  # move p99 / floor p99 (issue 18: at most 2× at 32 and 64 hosts)
GOAL_CPU_RATIO = 2.0  # agent CPU per move per receiver / floor CPU per message per subscriber
GOAL_FLOOR_HOSTS = (32, 64)
GOAL_RATE_PER_S = 300
GOAL_COLD_MS = 2000
GOAL_RSS_MB = 60
GOAL_BIG_HOSTS = 64
GOAL_ETCD_HOSTS = (8, 32, 64)


def fmt(v, digits: int = 2, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def curve_rows(cv: dict) -> list[tuple[str, str, str, str]]:
    """(figure, with CURVE, without, overhead) rows of the curve phase: one source for the table
    and the Markdown."""
    on, off, ov = cv["curve"], cv["insecure"], cv["overhead_pct"]

    def change(v):
        return "-" if v is None else f"{v:+.1f} %"
    return [
        ("moves converged", f"{on['converged']}", f"{off['converged']}", ""),
        ("convergence p50", fmt(on["latency_ms"]["p50"], 2, " ms"), fmt(off["latency_ms"]["p50"], 2, " ms"),
         change(ov["p50"])),
        ("convergence p99", fmt(on["latency_ms"]["p99"], 2, " ms"), fmt(off["latency_ms"]["p99"], 2, " ms"),
         change(ov["p99"])),
        ("agents' CPU during the moves", fmt(on["agents_cpu_s"], 2, " s"), fmt(off["agents_cpu_s"], 2, " s"), ""),
    ]


def balance_rows(b: dict) -> list[tuple[str, str, str]]:
    """(event, figure, value) rows of the balance phase: one source for the table and the Markdown."""
    e, r = b["evacuate"], b["rebalance"]
    ev = f"evacuate {e['host']} ({e['vms_on_host']} VMs, {e['max_concurrent']} at once), {b['hosts']} hosts"
    rb = f"rebalance from all VMs on {r['skewed_hosts']} hosts ({r['max_concurrent']} at once)"
    return [
        (ev, "request → host empty, every move ended", fmt(e["until_empty_ms"], 0, " ms")),
        ("", "move convergence p50 / p99", f"{fmt(e['latency_ms']['p50'])} / {fmt(e['latency_ms']['p99'])} ms"),
        ("", "moves converged / VMs left on host", f"{e['converged']} of {e['moves']} / {e['vms_left_on_host']}"),
        ("", "data-plane drops meanwhile (no traffic: a proxy)", fmt(e["dataplane_drops"])),
        (rb, "moves planned / run / converged", f"{r['planned']} / {r['moves']} / {r['converged']}"),
        ("", "request → every move ended", fmt(r["total_ms"], 0, " ms")),
        ("", "move convergence p50 / p99", f"{fmt(r['latency_ms']['p50'])} / {fmt(r['latency_ms']['p99'])} ms"),
        ("", f"VM spread max-min before → after (threshold {r['threshold']})",
         f"{fmt(r['spread_before'], 0)} → {fmt(r['spread_after'])}"),
        ("", "tables agree with the inventory", "yes" if b["tables_agree"] else "NO"),
    ]


def with_ratio(v: float | None, r: float | None) -> str:
    return fmt(v) + (f" ({r:.1f}×)" if r is not None else "")


def with_ratios(v: float | None, r_floor: float | None, r_etcd: float | None) -> str:
    """`v (2.1× floor, 0.8× etcd)`: the value with its ratios to both baselines of the same N."""
    parts = [f"{r:.1f}× {name}" for r, name in ((r_floor, "floor"), (r_etcd, "etcd")) if r is not None]
    return fmt(v) + (f" ({', '.join(parts)})" if parts else "")


def p50_p99(part: dict | None) -> str:
    return f"{fmt(part['latency_ms']['p50'])} / {fmt(part['latency_ms']['p99'])}" if part else "-"


def floor_cpus(e: dict) -> str:
    """`(floor 35, agent-shaped 83)`: both floors' CPU per message per subscriber of this N."""
    parts = [f"{name} {fmt(e[key]['cpu_us_per_msg_per_subscriber']['mean'], 0)}"
             for key, name in (("floor", "floor"), ("floor_agent", "agent-shaped")) if e.get(key)]
    return f"({', '.join(parts)})" if parts else ""


def by_hosts(results: dict, n: int) -> dict | None:
    return next((e for e in results["per_hosts"] if e["hosts"] == n), None)


# ---------------------------------------------------------------------- headline and goals


def headline(results: dict) -> dict:
    per = [e for e in results["per_hosts"] if e.get("moves")]
    big = max(per, key=lambda e: e["hosts"], default=None)
    h: dict = {}
    if big is not None:
        h["hosts"] = big["hosts"]
        h["move_p99_ms"] = big["moves"]["latency_ms"]["p99"]
        if big.get("floor"):
            h["floor_p99_ms"] = big["floor"]["latency_ms"]["p99"]
            h["p99_vs_floor"] = ratio(h["move_p99_ms"], h["floor_p99_ms"])
            if big.get("floor_agent"):
                h["floor_agent_p99_ms"] = big["floor_agent"]["latency_ms"]["p99"]
                h["p99_vs_floor_agent"] = ratio(h["move_p99_ms"], h["floor_agent_p99_ms"])
        if big.get("etcd"):
            h["etcd_p99_ms"] = big["etcd"]["latency_ms"]["p99"]
            h["p99_vs_etcd"] = ratio(h["move_p99_ms"], h["etcd_p99_ms"])
        # dvswitch / etcd p99 at every N (the goal: <= 1 at 8, 32 and 64 hosts).
        vs = {str(e["hosts"]): ratio(e["moves"]["latency_ms"]["p99"], e["etcd"]["latency_ms"]["p99"])
              for e in per if e.get("etcd")}
        if vs:
            h["p99_vs_etcd_by_hosts"] = vs
        h["agent_rss_mb_max"] = big["moves"]["cost"]["memory"]["agent_rss_mb_max"]
    load = results.get("load")
    if load:
        h["max_rate_p99_under_50ms"] = load["max_rate_p99_under_goal"]
        h["max_rate_e2e_p99_under_50ms"] = load["max_rate_e2e_p99_under_goal"]
    cold = results.get("cold_start")
    if cold:
        h["cold_start_ms"] = cold["all_applied_ms"]
        h["cold_start_ports"] = cold["ports"]
        h["cold_start_hosts"] = cold["hosts"]
        h["cold_agent_peak_rss_mb_max"] = cold["agent_peak_rss_mb_max"]
    ha = results.get("ha")
    if ha:
        h["ha_total_ms"] = ha["total_ms"]
        h["ha_detection_ms"] = ha["detection_ms"]
        h["ha_restart_convergence_ms"] = ha["restart_convergence_ms"]
    return h


def goals(results: dict) -> list[dict]:
    """The project's goals, measured (never asserted): value, whether it was met, and a note.
    `met` is None when the goal's setup was not run (e.g. --quick: fewer hosts or ports)."""
    out = []

    def add(name: str, value, met, note: str = "", limit: float | None = None) -> None:
        g = {"goal": name, "value": value, "met": met, "note": note}
        if limit is not None:
            g["limit"] = limit  # a ratio goal: value at most this
        out.append(g)

    other = "not the goal's setup, so not judged"
    sizes = " and ".join(map(str, GOAL_FLOOR_HOSTS))
    both = [e for e in results["per_hosts"] if e.get("moves") and e.get("floor")]

    def vs_floor(name: str, limit: float, of, shape_of) -> None:
        rs = {e["hosts"]: ratio(*of(e)) for e in both}
        rs = {n: r for n, r in rs.items() if r is not None}
        if not rs:
            add(name, None, None, "not run", limit=limit)
            return
        judged = set(GOAL_FLOOR_HOSTS) <= set(rs)
        worst = max(r for n, r in rs.items() if n in GOAL_FLOOR_HOSTS) if judged else max(rs.values())
        # What the agent-shaped floor (no dvswitch code: uvloop, CURVE, a report per message)
        # alone costs against the floor: how much of the gap the architecture takes.
        shaped = {e["hosts"]: ratio(shape_of(e), of(e)[1]) for e in both if e.get("floor_agent")}
        note = "; ".join(f"{n} hosts {r:.2f}×" + (f" (agent-shaped floor {shaped[n]:.2f}×)" if shaped.get(n) else "")
                         for n, r in rs.items())
        add(name, worst, worst <= limit if judged else None,
            note + ("" if judged else f": not every one of {sizes} hosts run, so not judged"), limit=limit)

    vs_floor(f"move p99 within {GOAL_P99_RATIO:g}× of the floor's p99 at {sizes} hosts", GOAL_P99_RATIO,
             lambda e: (e["moves"]["latency_ms"]["p99"], e["floor"]["latency_ms"]["p99"]),
             lambda e: e["floor_agent"]["latency_ms"]["p99"])
    vs_floor(f"agent CPU per move per receiver within {GOAL_CPU_RATIO:g}× of the floor's per message per "
             f"subscriber at {sizes} hosts", GOAL_CPU_RATIO,
             lambda e: (e["moves"]["cost"]["cpu"]["agent_us_per_move_per_receiver"],
                        e["floor"]["cpu_us_per_msg_per_subscriber"]["mean"]),
             lambda e: e["floor_agent"]["cpu_us_per_msg_per_subscriber"]["mean"])
    name = f">= {GOAL_RATE_PER_S} moves/s with p99 < 50 ms"
    load = results.get("load")
    if load:
        best = load["max_rate_p99_under_goal"]
        tried = max(s["rate_per_s"] for s in load["steps"])
        judged = load["hosts"] >= 32 and tried >= GOAL_RATE_PER_S
        add(name, best, (best is not None and best >= GOAL_RATE_PER_S) if judged else None,
            f"{load['hosts']} hosts, rates up to {tried:g}/s tried" + ("" if judged else f": {other}"))
    else:
        add(name, None, None, "not run")
    cold = results.get("cold_start")
    cold_name = f"cold start of 8,000 ports on 32 hosts under {GOAL_COLD_MS / 1000:g} s"
    rss_name = f"agent RSS under {GOAL_RSS_MB} MB with 8,000 entries"
    if cold:
        judged = cold["ports"] >= 8000 and cold["hosts"] >= 32
        v = cold["all_applied_ms"]
        add(cold_name, v, (v is not None and v < GOAL_COLD_MS and cold["converged"] == cold["ports"])
            if judged else None, f"{cold['ports']:,} ports on {cold['hosts']} hosts" + ("" if judged else f": {other}"))
        rss = cold["agent_peak_rss_mb_max"] or cold["agent_rss_mb_max"]
        judged = cold["ports"] >= 8000
        add(rss_name, rss, (rss is not None and rss < GOAL_RSS_MB) if judged else None,
            f"peak RSS of the largest agent, {cold['ports']:,} entries" + ("" if judged else f": {other}"))
    else:
        add(cold_name, None, None, "not run")
        add(rss_name, None, None, "not run")
    name = f"move p99 <= etcd watch p99 at {', '.join(map(str, GOAL_ETCD_HOSTS))} hosts"
    both = [e for e in results["per_hosts"] if e.get("moves") and e.get("etcd")]
    if both:
        rs = {e["hosts"]: ratio(e["moves"]["latency_ms"]["p99"], e["etcd"]["latency_ms"]["p99"]) for e in both}
        worst = max((r for r in rs.values() if r is not None), default=None)
        judged = set(GOAL_ETCD_HOSTS) <= set(rs)
        note = "; ".join(f"{n} hosts {r:.2f}×" for n, r in rs.items() if r is not None)
        add(name, worst, (worst is not None and worst <= 1.0) if judged else None,
            note + ("" if judged else f": not every one of {', '.join(map(str, GOAL_ETCD_HOSTS))} hosts run, "
                    "so not judged"))
    else:
        add(name, None, None, results.get("etcd_skipped") or "not run")
    e64 = next((e for e in results["per_hosts"] if e["hosts"] >= GOAL_BIG_HOSTS and e.get("moves")), None)
    if e64:
        m = e64["moves"]
        add(f"{GOAL_BIG_HOSTS} hosts run and converge", f"{m['converged']}/{m['moves']} moves",
            m["converged"] == m["moves"], f"{e64['hosts']} hosts")
    else:
        add(f"{GOAL_BIG_HOSTS} hosts run and converge", None, None, f"not run (add {GOAL_BIG_HOSTS} to --hosts)")
    return out


# ---------------------------------------------------------------------- rich tables


def tables(doc: dict) -> list[Table]:
    r = doc["results"]
    out = []
    t = Table("hosts", "moves", "converged", "p50 ms", "p90 ms", "p99 ms", "max ms", "floor p50 / p99 ms",
              "etcd p50 / p99 ms",
              title="Move convergence, moves one after another (× = ratio to the floor / to etcd of the same N)")
    for e in r["per_hosts"]:
        m, f = e.get("moves"), e.get("floor")
        if not m:
            continue
        d, q, qe = m["latency_ms"], m.get("latency_vs_floor", {}), m.get("latency_vs_etcd", {})
        t.add_row(str(e["hosts"]), str(m["moves"]), str(m["converged"]),
                  *(with_ratios(d[k], q.get(k), qe.get(k)) for k in ("p50", "p90", "p99", "max")),
                  p50_p99(f), p50_p99(e.get("etcd")))
    out.append(t)
    t = Table("hosts", "receive loop", "subscribers", "msgs", "p50 ms", "p90 ms", "p99 ms", "max ms",
              "CPU µs/msg/sub", "lost",
              title="Floor: raw pyzmq PUB → N-1 subscriber processes (until the last has it); the agent-shaped "
                    "one reads as an agent does: uvloop, CURVE, a report per message")
    for e in r["per_hosts"]:
        for key, loop in (("floor", "blocking recv()"), ("floor_agent", "agent-shaped")):
            f = e.get(key)
            if f:
                d = f["latency_ms"]
                t.add_row(str(e["hosts"]), loop, str(f["subscribers"]), str(f["msgs"]), fmt(d["p50"]), fmt(d["p90"]),
                          fmt(d["p99"]), fmt(d["max"]), fmt(f["cpu_us_per_msg_per_subscriber"]["mean"], 0),
                          str(f["lost"]))
    if t.row_count:
        out.append(t)
    t = Table("hosts", "watchers", "puts", "puts/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "CPU µs/msg/watcher",
              "lost", title="etcd: one put → N watcher processes, gRPC watch (until the last is notified)")
    for e in r["per_hosts"]:
        et = e.get("etcd")
        if et:
            d = et["latency_ms"]
            t.add_row(str(e["hosts"]), str(et["watchers"]), str(et["msgs"]), fmt(et["achieved_puts_per_s"], 0),
                      fmt(d["p50"]), fmt(d["p90"]), fmt(d["p99"]), fmt(d["max"]),
                      fmt(et["cpu_us_per_msg_per_watcher"]["mean"], 0), str(et["lost"]))
    if t.row_count:
        out.append(t)
    elif r.get("etcd_skipped"):
        t.add_row("-", "-", "-", "-", "-", "-", "-", "-", "-", "-")
        t.caption = r["etcd_skipped"]
        out.append(t)
    t = Table("hosts", "msgs/move", "payload B/move", "loopback B/move", "agent CPU µs/move/receiver",
              "controller CPU ms/move", "idle: heartbeats/s, cores", "agent RSS MB mean/max",
              title="Cost per move (what is counted: see bench.json 'definitions')")
    for e in r["per_hosts"]:
        m = e.get("moves")
        if not m:
            continue
        c = m["cost"]
        lo = c["loopback"]
        floor_cpu = floor_cpus(e)
        t.add_row(str(e["hosts"]), fmt(c["msgs_per_move"]["total"], 1), fmt(c["payload_bytes_per_move"]["total"], 0),
                  fmt(lo["bytes_per_move_minus_idle"], 0) if lo else "-",
                  f"{fmt(c['cpu']['agent_us_per_move_per_receiver'], 0)} {floor_cpu}",
                  fmt(c["cpu"]["controller_ms_per_move"]),
                  f"{fmt(c['background']['heartbeats_received_per_s_idle'], 0)}, "
                  f"{fmt(c['background']['agents_cpu_cores_idle'])}",
                  f"{fmt(c['memory']['agent_rss_mb_mean'], 1)} / {fmt(c['memory']['agent_rss_mb_max'], 1)}")
    out.append(t)
    load = r.get("load")
    if load:
        t = Table("offered /s", "sent", "converged", "achieved /s", "p50 ms", "p99 ms (× floor, × etcd)",
                  "request→reply p99",
                  "send lag p99", "agents / ctl cores", f"p99 < {load['p99_goal_ms']:g} ms",
                  title=f"Load curve at {load['hosts']} hosts (open loop, concurrent moves)")
        for s in load["steps"]:
            t.add_row(f"{s['rate_per_s']:g}", str(s["sent"]), str(s["converged"]), fmt(s["achieved_per_s"], 0),
                      fmt(s["latency_ms"]["p50"]),
                      with_ratios(s["latency_ms"]["p99"], s.get("p99_vs_floor"), s.get("p99_vs_etcd")),
                      fmt(s["e2e_ms"]["p99"]), fmt(s["send_lag_ms"]["p99"]),
                      f"{fmt(s['agents_cpu_cores'])} / {fmt(s['controller_cpu_cores'])}",
                      "[green]yes[/green]" if s["pass"] else "[red]no[/red]")
        out.append(t)
    cold, ha = r.get("cold_start"), r.get("ha")
    if cold or ha:
        t = Table("event", "figure", "value", title="Mass events")
        if cold:
            t.add_row(f"cold start: {cold['ports']:,} ports, {cold['hosts']} hosts", "request → last agent applied",
                      fmt(cold["all_applied_ms"], 0, " ms"))
            t.add_row("", "request → batch reply", fmt(cold["reply_ms"], 0, " ms"))
            t.add_row("", "ports applied everywhere / agents holding all",
                      f"{cold['converged']:,} / {cold['agents_holding_all']} of {cold['hosts']}")
            t.add_row("", "ops the controller saw converge in time", f"{cold['controller_converged_ops']:,}")
            t.add_row("", "agent RSS MB mean / max / peak",
                      f"{fmt(cold['agent_rss_mb_mean'], 1)} / {fmt(cold['agent_rss_mb_max'], 1)} / "
                      f"{fmt(cold['agent_peak_rss_mb_max'], 1)}")
        if ha:
            t.add_row(f"HA: SIGKILL {ha['victim']} ({ha['vms_on_victim']} VMs), {ha['hosts']} hosts",
                      f"detection (dead after {ha['dead_after_ms']} ms)", fmt(ha["detection_ms"], 0, " ms"))
            t.add_row("", "restart convergence (first attach → last apply)",
                      fmt(ha["restart_convergence_ms"], 0, " ms"))
            t.add_row("", "total: kill → all running elsewhere, known everywhere", fmt(ha["total_ms"], 0, " ms"))
            t.add_row("", "restarted / running elsewhere / tables agree",
                      f"{ha['restarts_converged']} / {ha['running_elsewhere']} / {'yes' if ha['tables_agree'] else 'NO'}")
        out.append(t)
    if r.get("curve"):
        cv = r["curve"]
        t = Table("figure", "CURVE", "no CURVE", "overhead",
                  title=f"CURVE on and off: {cv['hosts']} hosts, {cv['moves_per_mode']} moves each, "
                        f"{cv['rounds']} alternating rounds (goal: overhead at most 10 % on p50 and p99)")
        for row in curve_rows(cv):
            t.add_row(*row)
        out.append(t)
    if r.get("profile"):
        out.append(profile_table(r["profile"]))
    if r.get("balance"):
        t = Table("event", "figure", "value", title="Evacuate and rebalance")
        for row in balance_rows(r["balance"]):
            t.add_row(*row)
        out.append(t)
    t = Table("goal", "measured", "met", title="Goals (measured, never asserted)")
    for g in doc["goals"]:
        met = "-" if g["met"] is None else ("[green]yes[/green]" if g["met"] else "[red]no[/red]")
        t.add_row(g["goal"], goal_note(g), met)
    out.append(t)
    return out


def missed_by(g: dict) -> str:
    """How far a missed goal is from being met, in the goal's own terms ("" if met or not judged)."""
    v = g["value"]
    if g["met"] is not False or not isinstance(v, (int, float)):
        return ""
    if "etcd" in g["goal"]:
        return f"missed by {v:.2f}×: the worst p99 must fall to etcd's (1×)"
    if g.get("limit"):
        what = "CPU" if "CPU" in g["goal"] else "p99"
        return f"missed by {v / g['limit']:.1f}×: {what} must fall from {v:.2f}× to {g['limit']:g}× the floor"
    if "moves/s" in g["goal"]:
        return f"missed: {v:g} of {GOAL_RATE_PER_S} moves/s ({v / GOAL_RATE_PER_S:.0%} of the goal)"
    if "cold start" in g["goal"]:
        return f"missed by {v - GOAL_COLD_MS:,.0f} ms"
    if "RSS" in g["goal"]:
        return f"missed by {v - GOAL_RSS_MB:.1f} MB"
    return ""


def goal_note(g: dict) -> str:
    if g["value"] is None:
        return g["note"] or "—"
    return goal_value(g) + (f" ({g['note']})" if g["note"] else "")


def goal_value(g: dict) -> str:
    v = g["value"]
    if v is None:
        return "—"
    if "etcd" in g["goal"]:
        return f"worst {v:.2f}× etcd"
    if g.get("limit"):
        return f"worst {v:.2f}×"
    if "moves/s" in g["goal"]:
        return f"{v:g} moves/s"
    if "cold start" in g["goal"]:
        return f"{v:,.0f} ms"
    if "RSS" in g["goal"]:
        return f"{v:.1f} MB"
    return str(v)


# ---------------------------------------------------------------------- plots


def plots(doc: dict, out: Path) -> dict[str, str]:
    """PNG plots (matplotlib, Agg): latency CDF per N, p99 vs N, p99 vs move rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = doc["results"]
    files: dict[str, str] = {}
    per = [e for e in r["per_hosts"] if e.get("moves") or e.get("floor") or e.get("etcd")]
    if per:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, e in enumerate(per):
            color = f"C{i}"
            for key, style, label in (("moves", "-", "moves"), ("floor", "--", "floor"),
                                      ("floor_agent", "-.", "agent-shaped floor"), ("etcd", ":", "etcd")):
                part = e.get(key)
                vals = sorted(part["latencies_ms"] if part and "latencies_ms" in part else [])
                if vals:
                    ys = [(k + 1) / len(vals) for k in range(len(vals))]
                    ax.step(vals, ys, style, where="post", color=color, label=f"N={e['hosts']} {label}")
        ax.set_xscale("log")
        ax.set_xlabel("ms until the last host has it")
        ax.set_ylabel("fraction of moves / messages")
        ax.set_title("Latency CDF (solid: moves, dashed: floor, dash-dot: agent-shaped floor, dotted: etcd)",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files["latency_cdf"] = _save(fig, out / "latency_cdf.png", plt)

        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [e["hosts"] for e in per]
        for key, label, style, color in (("moves", "moves", "o-", "C0"), ("floor", "floor", "s--", "C2"),
                                         ("floor_agent", "agent-shaped floor", "d-.", "C4"), ("etcd", "etcd", "^:", "C3")):
            for q, alpha in (("p99", 1.0), ("p50", 0.4)):
                pts = [(e["hosts"], e[key]["latency_ms"][q]) for e in per if e.get(key)]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, alpha=alpha,
                            label=f"{label} {q}")
        ax.set_xticks(ns)
        ax.set_xlabel("hosts (N)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title("Latency vs cluster size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files["p99_vs_hosts"] = _save(fig, out / "p99_vs_hosts.png", plt)
    load = r.get("load")
    if load and load["steps"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [s["rate_per_s"] for s in load["steps"]]
        ax.plot(rates, [s["latency_ms"]["p99"] for s in load["steps"]], "o-", label="convergence p99")
        ax.plot(rates, [s["e2e_ms"]["p99"] for s in load["steps"]], "s--", label="request → reply p99")
        ax.axhline(load["p99_goal_ms"], color="red", lw=0.8, label=f"{load['p99_goal_ms']:g} ms goal")
        f = (by_hosts(r, load["hosts"]) or {}).get("floor")
        if f:
            ax.axhline(f["latency_ms"]["p99"], color="gray", ls=":", label="floor p99")
        et = (by_hosts(r, load["hosts"]) or {}).get("etcd")
        if et:
            ax.axhline(et["latency_ms"]["p99"], color="C3", ls="-.", label=f"etcd p99 ({et['rate_per_s']:g} puts/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered moves/s")
        ax.set_ylabel("ms")
        ax.set_title(f"p99 vs move rate, {load['hosts']} hosts")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files["p99_vs_rate"] = _save(fig, out / "p99_vs_rate.png", plt)
    return files


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------- Markdown


EARLIER = """## Earlier measurements (before `dvs bench`, kept for reference)

`dvs demo --hosts N --vms 8N --moves 50 --json` (moves one after another; latency = last agent's
apply stamp − switchover stamp), two runs each, 2026-11-26:

| hosts | p50 ms | p99 ms |
|---|---|---|
| 8 | 1.1 – 1.7 | 1.5 – 4.1 |
| 32 | 9.3 – 13.1 | 13.6 – 36.9 |

CPU per message, one publisher → 31 subscriber processes, ~60-byte msgpack frames at 200/s:

| receiver | CPU per message per subscriber |
|---|---|
| blocking `recv()` | ~148 µs |
| uvloop `add_reader` + drain, decode only | ~194 µs |
| dvswitch agent (decode, validate, merge, report) | ~280 µs |

At 32 hosts the idle mesh (heartbeats at 500 ms) cost about 0.55 of one core in total then.
"""

SESSION_NOTES = """### What changed 2026-12-08, side by side (same sitting, old and new build alternating)

Three pairs of `dvs bench --hosts 32 --vms 1280 --moves 200 --rates 100,300,600 --phases
floor,moves,load --no-docs` (CURVE on), build 645807b against 18e3713; medians, per-pair ratios
in brackets:

| figure | before | after | ratio |
|---|---|---|---|
| sequential move p50 ms | 5.28 | 3.51 | 0.66 (0.66, 0.62, 0.81) |
| sequential move p99 ms | 9.21 | 6.80 | 0.74 (0.67, 0.73, 0.87) |
| agent CPU µs/move/receiver | 462 | 176 | 0.38 (0.38, 0.37, 0.43) |
| controller CPU ms/move | 2.33 | 1.47 | 0.63 (0.63, 0.62, 0.74) |
| moves one after another, per s | 36 | 184 | 5.1 |
| 100 moves/s: p99 ms, agents' cores | 8.57, 0.93 | 6.30, 0.77 | 0.74 (0.78, 0.72, 0.87) |
| 300 moves/s: p99 ms, agents' cores | 61.5, 1.60 | 29.9, 1.43 | 0.49 (0.36, 0.43, 1.53) |
| 600 moves/s: achieved/s | 538 | 572 | 1.06 |

Against the build before the redesign of issue 17 (8a2890c, no CURVE, so this build with
`--insecure`), three pairs of `dvs bench --hosts 8,32 --vms 1280 --moves 200 --phases moves
--no-docs`: at 8 / 32 hosts p50 0.58 / 0.75×, p99 0.55 / 0.76×, agent CPU 0.48 / 0.45×,
controller CPU 0.77 / 0.82× (it was 1.15 / 1.09× at the end of 2026-12-04).

- **Apply reports at once.** An agent held each apply report back: at most one per 20 ms, each
  waiting 5 ms after its first apply to ride on a later wake-up (the RARP's, mostly), its own
  timer at 20 ms. Moves one after another wait for every report, so they ran at ~36/s at 32
  hosts and most reports cost a timer wake-up. Now a report goes in the wake-up that applied the
  update, at most one per 1000 × N / 20,000 ms (`applied_report_budget_per_s`: 1.6 ms apart at
  32 hosts, 50 ms at 1,000, where the simulated controller now reads 188,000 reports instead of
  340,000). A first try at "at once, unless within 5 ms of the last" showed why a fixed hold is
  wrong: whenever consecutive moves came closer than the hold, every report waited for the timer
  and the moves fell into step with it.
- **Report pacing** (controller/reportpace.py): while more than one op is in flight (smoothed
  over ticks), the controller asks every agent to batch (10 ms, renewed every second, a 3 s
  lease), and a held report rides on the agent's next gossip wake-up. Nobody waits on one move
  then; moves one after another never batch. At 300 moves/s it took the agents from ~1.55 to
  ~1.45 cores and p99 from 49-123 to 24-40 ms in alternating pairs (one pair above: 56 ms).
- **No RARP over the overlay** (EVPN's way; `dvs up --rarp-to-overlay` floods it as before):
  every VTEP learns a move from the gossip, so the flooded copy told no host anything and cost
  each a second wake-up per move (~30 % of a bystander's CPU).
- **Sockets drain until `ZMQ_EVENTS` shows no `POLLIN`**, not until a NOBLOCK `recv` raises:
  pyzmq's `zmq.Again` runs two function-level imports and a `strerror` per exception, twice per
  update (the SUB, then the control socket after the report). Gossip frames go from the SUB
  reader straight to the core.
- **A quadratic log**: every new flapping MAC made each agent log every flapping MAC again
  (61,000 lines per agent after 4,000 moves of 1,280 VMs, and most of its CPU). Now one line per
  MAC as it starts flapping.
- **The agent-shaped floor** (new in this run's tables): the floor's fan-out read as an agent
  reads, with no dvswitch code: uvloop `add_reader`, CURVE, a report per wake-up. ~81 µs per
  message per subscriber against the blocking floor's ~32 µs (2.3-2.6×), p99 1.4-2.2× the
  floor's: the goals "within 2× of the floor" on CPU and p99 are beyond this architecture (an
  event loop, CURVE, a report per move) before any of dvswitch's own code runs. Measured by hand
  beside it (one-off harness, 32 hosts): + the agent core's work per update (decode, validate,
  merge, report) 130 µs, + one SUB socket per peer 138 µs, a real bystander ~145-150 µs (main
  thread ~105, libzmq I/O thread ~45, 1.4 and 1.9 wake-ups per move). The core's own path is
  ~10 µs per update in a hot loop; with 33 processes on 2 cores every wake-up starts with cold
  caches, and it costs ~45.
- **Where a bystander's time goes now** (Linux perf, 32 hosts at 300 moves/s, all agents): the
  Python interpreter 46 %, the kernel 32 % (context switches alone ~20 %: three per update, the
  I/O thread's read, the event loop's wake, the I/O thread's send of the report), libzmq 9 %,
  uvloop 4 %, libsodium 1.5 %. What would cut it further is structural: fewer wake-ups per update
  (the report's send wakes libzmq's I/O thread a second time) or fewer receivers per update.
- **CURVE at 64 hosts**: the acceptance run above measured +19 % p50 and +13 % p99 with CURVE
  (+2.8 % / +3.6 % on 2026-12-04); a one-off run: 32 hosts -0.9 % / +20.8 %, 64 hosts +23 % /
  +15 %. Per move the agents spent the same CPU with and without it (64 hosts, 700 moves: 14.4
  vs 14.3 ms for all agents together), so what CURVE adds is latency, not work: the
  destination's libzmq I/O thread encrypts each update once per subscriber, one after another.
"""

SESSION_NOTES_1204 = """### What changed 2026-12-04, side by side (same sitting, old and new build alternating)

Three pairs of `dvs bench --hosts 32 --vms 1280 --moves 200 --rates 100,300,600 --phases moves,load
--no-docs` (CURVE on), build 9bdd786 against this one; medians, per-pair ratios in brackets:

| figure | before | after | ratio |
|---|---|---|---|
| sequential move p50 ms | 7.52 | 6.29 | 0.84 (0.97, 0.89, 0.81) |
| sequential move p99 ms | 15.16 | 11.55 | 0.76 (0.81, 0.93, 0.76) |
| agent CPU µs/move/receiver | 570 | 575 | 1.01 (1.34, 1.01, 0.85): noise |
| controller CPU ms/move | 2.41 | 2.75 | 1.14 (1.18, 1.11, 1.14) |
| 100 moves/s: p99 ms | 18.1 | 11.0 | 0.61 (0.46, 0.52, 0.99) |
| 300 moves/s: p99 ms | 61.9 | 80.8 | 1.30 (0.70, 1.30, 2.05): noise, the agents saturate |
| 300 moves/s: achieved/s | 288 | 290 | 1.01 |
| 300 moves/s: agents / controller cores | 1.73 / 0.14 | 1.69 / 0.18 | |

- **Three acceptance runs this session** (`dvs bench --hosts 8,32,64 --vms 1280 --moves 200
  --json`, 195-204 s each): move p99 / etcd p99 at 8 / 32 / 64 hosts = 0.78 / 0.83 / 0.70, then
  1.08 / 1.66 / 0.55, then 0.86 / 1.17 / 0.25 (this file's run). dvswitch's p99 at 32 hosts moved
  8.7-12.9 ms, etcd's 5.3-15.6 ms: the etcd goal is at the edge at 8 and 32 hosts and met at 64
  (where etcd's 64 watchers starve); one run does not settle it. The floor's CPU per message
  moved too (29-52 µs), and with it the CPU ratio (9-15×). At 300 moves/s (32 hosts): p99 70.9,
  79.3, 58.6 ms at 287-297 moves/s achieved.
- **Journal group commit** (controller/groupcommit.py): the controller fsynced its journal on the
  event loop, one fsync per tick with a record (4.75 ms of wall time per move in a wall-clock
  profile on this virtual disk). A worker thread now writes and fsyncs while the loop goes on; what
  is journaled meanwhile shares the next fsync; messages wait for the records before them. It costs
  the controller ~10 % more CPU per move (the hand-off to the thread and back, and more wake-ups:
  the loop no longer sits in fsync while apply reports pile up into one drain), and the controller
  is not what saturates (0.17 of 2 cores at 300 moves/s); it buys lower latency at moderate load.
  A first version went through `run_in_executor`; its futures were ~5 % of the controller's Python
  time (py-spy), so the writer is now a plain thread fed by a queue: controller CPU/move 1.10×
  the inline-fsync build (pairs 1.10, 1.14, 1.00; 300 sequential moves at 32 hosts).
- **The load curve and the cold start run at 32 hosts** when `--hosts` has it, the size their
  goals name. In the first `--hosts 8,32,64` run both ran at 64: the load curve passed only at
  10 moves/s (agents at 1.76 cores from 100/s on), and the cold start could not be timed (8,000
  ports × 64 agents = 512,000 apply stamps, more than the controller's `applied_log_max` of
  500,000 keeps; every agent held every port, the batch reply took 3.3 s).
- **Per frame**: a receiver remembers VTEP address → host (it parsed two addresses with
  `ipaddress` per datagram), a flood skips its per-port call when no vNIC is plugged, the wire
  checks validate containers in place (no copy per message), and the controller's CURVE gate
  remembers the host connections it judged. Within the noise of these runs.
- **What caps the rate at ~290 moves/s (32 hosts)**: the agents, at 1.67-1.73 of the 2 cores. Per
  move each of the 30 bystanders wakes for the update, for the RARP the destination floods over
  VXLAN, and for about one apply-report timer or heartbeat: 3.6 wake-ups per move in the profile
  above. Linux perf (the profile's first table) splits a bystander's CPU into the Python
  interpreter ~50-56 %, the kernel ~29-32 % (syscalls, wake-ups, loopback TCP and UDP), libzmq
  ~6 %, libsodium ~3 %, uvloop ~3 %; its I/O thread takes ~15 %. So half is our Python, spread
  thinly over each wake-up's path (drain, decode, merge, `_after`'s flush and timer, sends):
  `wire.decode` is ~1.3 µs, pyzmq's `Again` exception at the end of every drain ~3.7 µs, and no
  single function stands out. Levers left, each
  a protocol or product decision: no RARP over the overlay to hosts without a plugged vNIC in the
  VLAN (EVPN-style: the gossip already tells every VTEP; ~30 % of agent CPU per move in the
  2026-11-26 data plane on/off runs below), fewer wake-ups for heartbeats and report timers, and
  less Python per wake-up. A typed decoder (msgspec) would not help much: msgpack's own unpack is
  0.25 µs of decode's 1.3 µs per frame.
"""

PROFILE_NOTES = """### Earlier notes on where the time goes (2026-11-26, py-spy, strace and one-off scripts; not re-measured by `dvs bench`: its own profile is above)

- **Thread wake-ups, not the protocol.** One real agent fed by 31 fake peers (agent CPU per frame,
  all threads, machine shared): a heartbeat costs ~250-320 µs (uvloop thread ~200-270 + libzmq
  I/O thread ~50-60), an update ~400-500 µs with its share of apply reports. The same socket read
  by a bare uvloop `add_reader` loop that only decodes: ~200-240 µs; by `zmq.Poller`: ~200 µs; by a
  blocking `recv()`: ~110-140 µs. strace shows ~13 cheap syscalls per frame (epoll_wait in both
  threads, eventfd write/read, one recvfrom, polls of the socket mailbox); the rest is two context
  switches and cold caches per frame with 33 processes on 2 cores. So what helps is fewer frames
  and fewer wake-ups per frame: apply reports share frames over 20 ms and ride on later wake-ups,
  updates stand in for heartbeats, sockets drain with NOBLOCK `recv` until EAGAIN (reading
  `ZMQ_EVENTS` polls the mailbox: 6-10 µs each, two per frame before).
- **The floor moves with the machine's load.** Its p99 at 32 hosts ranged 2.6-16 ms across
  runs within one hour on this shared machine while the cluster's sequential p99 stayed at
  15-34 ms (p50 7-14 ms against the floor's 1.8-3.9 ms): the p99 ratio mostly measures how busy
  the machine was during the floor. The p50 ratio (2.5-6×) is the steadier figure: one delivery
  costs an agent ~2-3× the CPU of a blocking `recv()` subscriber (next item), and with the data
  plane on every receiver gets two deliveries per move (see below).
- **Idle mesh** at 32 hosts: ~2,000 heartbeats/s, ~0.5 core (heartbeats now stop while a host
  publishes updates, so under load the mesh's background mostly disappears).
- **Load curve**: the agents saturate at 1.2-1.5 cores whatever the offered rate (the rest of the
  2 cores: the controller ~0.15, the bench client, other users' programs). One move at 32 hosts
  costs the agents ~12 ms of CPU (31 deliveries of ~330-400 µs plus control and apply reports),
  so 100 moves/s is at the edge of p99 < 50 ms and 300/s is out of reach without fewer wake-ups
  per delivery (batching several moves per wake-up, which the open-loop rate only gives when
  the machine already queues). The controller is not the bottleneck (0.14-0.22 cores).
- **The data plane (on by default since it landed) costs ~+30 % agent CPU per move.** Each
  switchover floods a RARP over VXLAN to every host of the VLAN (all 31 here): a second delivery,
  and a second wake-up, per receiver and move. Same one-off harness, 32 hosts, two runs each,
  data plane on / off (`vtep_base="off"`): sequential p50 10.3-12.6 / 7.6-8.9 ms; agent CPU
  693-858 / 405-612 µs per move and receiver; at 100 moves/s agents 1.69-1.73 / 1.49-1.51 cores
  and p99 41-78 / 19-40 ms. Every goal figure above is measured with it on.
- **Cold start** (8,000 ports, 32 hosts): the controller's repair hints (new) misfired while it was
  behind on the 256,000 apply reports (~40,000 hints and 60 % of its CPU in sends in one run); it
  also scanned every op every tick. Fixed (hints wait while reports arrive late; expired ops are a
  prefix; unacked commands kept apart); `gc.freeze()` after startup and a young-generation
  threshold of 20,000 cut agent CPU by a third. What remains: ~0.2-0.3 s of `vm_create` before the
  first ATTACH (~38 µs per VM: op objects, journal JSON, fsync), then every agent applies 8,000
  entries. Since 2026-11-27 agents report gossiped updates by their origin's numbers (one range
  per message taken, `APPLY_REPORT`) instead of one row per entry: the controller reads 8,000
  own rows and ~1,000 ranges instead of validating 256,000 rows, and the claims a host numbered
  in one run share one apply set while every report covers them alike. Cold start 2,007 →
  1,090-1,101 ms, controller CPU 1.97 → ~1.0 s, agent CPU 0.18 → 0.09 s each (the goal is met).
- **Load curve after that change**: 300 moves/s achieved 287-293/s with p99 41.8-50.8 ms,
  around the goal's 50 ms (the agents at 1.74 cores). What is left there is the per-delivery
  wake-up cost above, twice per move and receiver with the RARP flood.
- **64 hosts** (`dvs bench --hosts 64 --vms 2560 --moves 100 --phases floor,moves --no-docs`,
  2026-11-27, 25 s): 100 of 100 moves converged, p50 13.5 ms, p99 28.2 ms (8.2× the floor's
  3.4 ms).
- **The simulator** (`dvs sim`, one process, virtual time; not a `dvs bench` figure): 1,000
  hosts × 8,000 VMs × 2,000 moves at 20 % loss in 42–60 s of wall time, 0.97 GB
  (`dvs sim --hosts 1000 --vms 8000 --moves 2000 --loss 0.2 --seed 7 --json --progress`,
  2026-11-27); the README's Speed section has the table by size and where that time goes.
"""

DEFINITIONS = """### What is measured, exactly

- **Move latency**: the controller's figure for each move: the last live agent's apply stamp minus the
  destination's switchover stamp, both `time.monotonic_ns()` on this machine. Moves run one after
  another (closed loop) from one client.
- **Floor**: the bench process publishes one small msgpack message (an UPDATES-like body) on a PUB
  socket, paced at a fixed rate, to N−1 subscriber processes (`python -m testbed.bench.floor`) that
  wait in a blocking `recv()` and stamp `time.monotonic_ns()` on receipt; the figure is the last
  subscriber's stamp minus the send stamp. Run with no cluster up. CPU per message per subscriber =
  the subscriber's process CPU time over the messages / messages. Every latency figure is also shown
  as a ratio to the floor's figure of the same N.
- **Agent-shaped floor**: the same fan-out, each subscriber built as an agent reads (uvloop, an
  `add_reader` on the SUB socket's FD drained until `ZMQ_EVENTS` shows no `POLLIN`, CURVE on the
  SUB and on a DEALER) and sending one small message to a ROUTER in the publisher's process per
  wake-up that took one, as an agent's apply report. No dvswitch code runs in it: the gap between
  it and the floor is what the architecture costs (an event loop's wake-up, CURVE, a second wake
  of libzmq's I/O thread per message to send), the gap between dvswitch and it dvswitch's own work.
- **etcd**: what a user would run instead of gossip (Calico and Flannel keep routes in etcd). One
  etcd member (Debian's `etcd-server`) on a tmpfs data dir, started and stopped by the bench by pid,
  and N watcher processes, one per host, each with one gRPC watch on the bench's prefix: etcd's own
  Go client (`etcdctl watch --prefix -w json`, Debian's `etcd-client`) where installed, its lines
  stamped on arrival by one pipe reader (so etcd's clients do not starve for CPU at 32 and 64
  hosts), else Python watchers with the `aetcd` client that stamp in their own code (`client` in
  bench.json says which). The bench, in the controller's role, puts the same
  number of values of the floor's frame size at the floor's rate (each put waits for its commit
  before the next), stamping `time.monotonic_ns()` just before each put. The
  figure is the last watcher's stamp minus the stamp just before the put was sent: the commit plus
  the fan-out. N watchers, not N−1: the writer is the controller, and every host learns from etcd.
  Skipped with a one-line note where etcd or aetcd is absent (`pip install -e '.[etcd]'`).
- **Messages per move** = 8 control messages fixed by the protocol (client request and reply,
  PREPARE, SWITCHOVER, DETACH and their three ACKs) + gossip updates received (sum over agents of
  the change in `stats.updates_received`) + APPLIED reports (entries in the move records'
  `applied_ms`) + repair (2 × change in `pulls_sent + snapshots_requested`). Heartbeats are the
  background and are counted apart (`heartbeats_received` per s while idle).
- **Payload bytes per move**: each of those messages encoded by `agent.wire` with the run's own
  values (VM, MAC, port, seq, incarnation), times its count; msgpack payload only (no ZMTP framing,
  routing-id frames or TCP/IP headers). **Loopback bytes per move**: the change in `lo` bytes sent
  during the moves, minus the idle rate (machine-wide: includes headers and anything else running).
- **CPU**: each process's CPU time, all threads (Linux `/proc/PID/task/*/schedstat`, in ns; psutil
  user+system elsewhere). Agent CPU per move per receiver = (all agents'
  CPU during the moves − their idle rate × duration) / moves / (N−1), comparable with the floor's
  CPU per message per subscriber. **RSS**: psutil `rss` after the phase; peak = Linux `VmHWM`.
- **Load curve** (largest N, same cluster): open loop, moves of random VMs not already moving to
  random other hosts, sent at the offered rate from one DEALER socket with many requests in flight
  (1 ms pacing granularity). Convergence p99 as above; request → reply is measured from each
  move's scheduled send time (no coordinated omission). A rate passes when every move converged,
  none failed or was left unsent, convergence p99 < 50 ms and converged moves/s ≥ 90 % of offered.
- **Cold start**: a fresh cluster; one `vm_create` batch of all ports; request sent → the last
  agent's apply stamp of the last port (one stamp per agent and port, read from the controller's
  `applied_log`, so it does not depend on the controller finishing its bookkeeping), then each
  agent's `mac_entries` is checked. The batch reply time is shown apart.
- **HA**: on the largest-N cluster, one host is given exactly the chosen number of VMs (by moves), then
  SIGKILLed. Detection = kill → first restarted VM attached on its new host (agent stamp; the
  controller's dead timeout runs from the last message it heard, up to one status interval before
  the kill, so detection can be shorter than it);
  restart convergence = that → the last live agent applied the last restarted VM; total = kill → that
  apply. Then every live agent's table is checked against the inventory.
"""


# Below this share of its offered put rate, etcd's figure is taken as bound by its watcher clients.
ETCD_FAIR_RATE_SHARE = 0.9


def etcd_starved_notes(results: dict) -> list[str]:
    """A line for every N at which etcd could not keep its offered put rate: its watchers (Python
    gRPC clients, one process per host) then share the machine's cores with it, and the figure
    measures starved clients more than etcd, so that N's dvswitch/etcd ratio is not a fair one."""
    notes = []
    for e in results.get("per_hosts", []):
        et = e.get("etcd") or {}
        got, offered = et.get("achieved_puts_per_s"), et.get("rate_per_s")
        if got and offered and got < ETCD_FAIR_RATE_SHARE * offered:
            notes.append(f"- **Not a fair comparison at {e['hosts']} hosts**: etcd achieved {got:.0f} of "
                         f"{offered:g} puts/s, its {e['hosts']} watcher processes ({et.get('watcher_client', 'aetcd')}) starved "
                         f"for CPU on this machine (client CPU per message and watcher "
                         f"{fmt((et.get('cpu_us_per_msg_per_watcher') or {}).get('mean'), 0)} µs), so its p99 there measures "
                         "the clients more than etcd; trust the ratio only where etcd kept its rate.")
    return notes


PROFILE_WHAT = {"agent": "receiving agent", "controller": "controller"}


def profile_markdown(prof: dict | None) -> list[str]:
    """Phase profile: where one move's CPU goes in a receiving agent and in the controller."""
    if not prof:
        return []
    lines = ["", f"### Where the time goes: profile per receiving agent per move ({prof['hosts']} hosts)", "",
             f"cProfile with the main thread's CPU clock in agent {prof['receiver']} (a host no move leaves or "
             f"enters: what every bystander does per move) and in the controller, over {prof['moves']} moves one "
             "after another. Profiling slows Python code, so read the shares, not the totals; \"process CPU\" "
             "adds libzmq's I/O thread. µs per move; the pstats files are in the output directory's `logs/` "
             "(`python -m pstats FILE`).", ""]
    lines += perf_markdown(prof.get("perf"), prof)
    lines += ["The same moves' Python calls (cProfile), which say what runs, not what it costs: "
              "cProfile slows each call by tens of times, so small functions look far bigger than they "
              "are (`wire.decode` takes ~1.3 µs unprofiled here).", ""]
    for who in ("agent", "controller"):
        w = prof.get(who)
        if not w:
            continue
        lines += [f"**{PROFILE_WHAT[who]}**: process CPU {fmt(w['cpu_us_per_move'], 0)} µs/move, main thread as "
                  f"profiled {fmt(w['profiled_us_per_move'], 0)} µs/move.", "",
                  "| area | calls/move | own µs/move | share |", "|---|---|---|---|"]
        total = w["profiled_us_per_move"] or 1
        for a in w["areas"][:10]:
            lines.append(f"| {a['area']} | {fmt(a['calls_per_move'], 2)} | {fmt(a['own_us_per_move'], 0)} | "
                         f"{a['own_us_per_move'] / total:.0%} |")
        lines += ["", "| function | calls/move | own µs/move | cumulative µs/move |", "|---|---|---|---|"]
        for t in w["top"][:12]:
            lines.append(f"| `{t['function']}` | {fmt(t['calls_per_move'], 2)} | {fmt(t['own_us_per_move'], 0)} | "
                         f"{fmt(t['cum_us_per_move'], 0)} |")
        lines.append("")
    return lines


def perf_markdown(pf: dict | None, prof: dict) -> list[str]:
    if not pf:
        return []
    if pf.get("skipped"):
        return [f"Linux perf: not run ({pf['skipped']}).", ""]
    lines = [f"**Linux perf**, {pf['moves']} moves before the cProfile ones, sampling at "
             f"~3 kHz (all threads{', kernel included' if pf['kernel_visible'] else '; user space only: not root'}"
             "): share of each process's CPU samples by shared object, and by thread (`python` is the "
             "event loop, `ZMQbg/IO/0` libzmq's I/O thread).", "",
             "| process | shared object | share |", "|---|---|---|"]
    for who in ("agent", "controller"):
        w = pf.get(who)
        if not w:
            continue
        if w.get("error"):
            lines.append(f"| {PROFILE_WHAT[who]} | {w['error']} | |")
            continue
        threads = ", ".join(f"{t['thread']} {t['share']:.0%}" for t in w["by_thread"][:3])
        for i, d in enumerate(w["by_dso"][:7]):
            lines.append(f"| {PROFILE_WHAT[who] + f' ({threads})' if i == 0 else ''} | {d['dso']} | "
                         f"{d['share']:.0%} |")
    return lines + [""]


def profile_table(prof: dict) -> Table:
    t = Table("process", "area", "calls/move", "own µs/move", "share",
              title=f"Where one move's CPU goes, profiled ({prof['hosts']} hosts, {prof['moves']} moves, "
                    f"receiver {prof['receiver']}; shares, not totals: profiling slows Python)")
    for who in ("agent", "controller"):
        w = prof.get(who)
        if not w:
            continue
        pw = (prof.get("perf") or {}).get(who) or {}
        if pw.get("by_dso"):
            t.add_row(f"{PROFILE_WHAT[who]}: perf", ", ".join(f"{d['dso']} {d['share']:.0%}" for d in pw["by_dso"][:5]),
                      "", "", "")
        total = w["profiled_us_per_move"] or 1
        for i, a in enumerate(w["areas"][:6]):
            t.add_row(f"{PROFILE_WHAT[who]} ({fmt(w['cpu_us_per_move'], 0)} µs/move)" if i == 0 else "",
                      a["area"], fmt(a["calls_per_move"], 2), fmt(a["own_us_per_move"], 0),
                      f"{a['own_us_per_move'] / total:.0%}")
    return t


def markdown(doc: dict, plot_files: dict[str, str]) -> str:
    r, env, h = doc["results"], doc["environment"], doc["headline"]
    lines = [
        "# Benchmarks",
        "",
        "Figures measured on the project's 2-core development machine by `dvs bench`, which runs real",
        "local clusters and the raw ZeroMQ floor in the same run. Tests never assert them; `dvs bench`",
        "re-measures them and rewrites this file. Other work (tests, simulators) may have shared the",
        "machine during a run, so treat single figures as noisy.",
        "",
        "## Latest run",
        "",
        f"Command: `{doc['command']}` — {env['date']}, wall time {doc['wall_s']:.0f} s.",
        "",
        f"Machine: {env['cpu_count']} CPUs, {env['platform']}; Python {env['python']}, pyzmq {env['pyzmq']}, "
        f"libzmq {env['libzmq']}, msgpack {env['msgpack']}, uvloop {env['uvloop']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['loadavg_start'])}"
        + (f"; during the run the machine's CPUs were {env['machine_cpu_busy_percent']:.0f} % busy"
           if env.get("machine_cpu_busy_percent") is not None else "")
        + (f", other programs using {env['other_programs_cpu_cores']:.2f} of the {env['cpu_count']} cores on average"
           if env.get("other_programs_cpu_cores") is not None else "") + ".",
        "",
    ]
    lines += ["### Headline", ""]
    if "p99_vs_floor" in h:
        lines.append(f"- {h['hosts']} hosts: move p99 {fmt(h['move_p99_ms'])} ms vs floor p99 "
                     f"{fmt(h['floor_p99_ms'])} ms = **{h['p99_vs_floor']:.1f}×** the floor"
                     + (f"; the agent-shaped floor (no dvswitch code) alone: p99 {fmt(h['floor_agent_p99_ms'])} ms, "
                        f"so moves are **{h['p99_vs_floor_agent']:.1f}×** it." if "p99_vs_floor_agent" in h else "."))
    if h.get("p99_vs_etcd_by_hosts"):
        lines.append("- Move p99 / etcd watch p99, same run: "
                     + ", ".join(f"**{v:.2f}×** at {n} hosts" for n, v in h["p99_vs_etcd_by_hosts"].items()
                                 if v is not None)
                     + " (below 1× = dvswitch converges faster than etcd notifies its watchers).")
    elif r.get("etcd_skipped"):
        lines.append(f"- etcd baseline: {r['etcd_skipped']}.")
    lines += etcd_starved_notes(r)
    if "max_rate_p99_under_50ms" in h:
        v = h["max_rate_p99_under_50ms"]
        lines.append(f"- Highest offered move rate with convergence p99 < 50 ms: **{fmt(v, 0) if v else 'none'}"
                     f"{' moves/s' if v else ''}** (request → reply p99 < 50 ms: "
                     f"{fmt(h['max_rate_e2e_p99_under_50ms'], 0) if h['max_rate_e2e_p99_under_50ms'] else 'none'}).")
    if "cold_start_ms" in h:
        lines.append(f"- Cold start, {h['cold_start_ports']:,} ports on {h['cold_start_hosts']} hosts: "
                     f"**{fmt(h['cold_start_ms'], 0)} ms**; agent peak RSS {fmt(h['cold_agent_peak_rss_mb_max'], 1)} MB.")
    if "ha_total_ms" in h:
        lines.append(f"- HA after SIGKILL: **{fmt(h['ha_total_ms'], 0)} ms** in total = detection "
                     f"{fmt(h['ha_detection_ms'], 0)} ms + restart convergence "
                     f"{fmt(h['ha_restart_convergence_ms'], 0)} ms.")
    lines += ["", "### Goals (measured, never asserted)", "", "| goal | measured | met |", "|---|---|---|"]
    for g in doc["goals"]:
        met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
        if missed_by(g):
            met += f" ({missed_by(g)})"
        lines.append(f"| {g['goal']} | {goal_note(g)} | {met} |")

    lines += ["", "### Move convergence vs the floor and etcd", "",
              "Moves one after another; ms; (×) = ratio to the floor's and to etcd's figure of the same N.", "",
              "| hosts | VMs | moves | converged | p50 | p90 | p99 | max | floor p50 / p99 | etcd p50 / p99 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["per_hosts"]:
        m, f = e.get("moves"), e.get("floor")
        if not m:
            continue
        d, q, qe = m["latency_ms"], m.get("latency_vs_floor", {}), m.get("latency_vs_etcd", {})
        lines.append(f"| {e['hosts']} | {doc['params']['vms']:,} | {m['moves']} | {m['converged']} | "
                     + " | ".join(with_ratios(d[k], q.get(k), qe.get(k)) for k in ("p50", "p90", "p99", "max"))
                     + f" | {p50_p99(f)} | {p50_p99(e.get('etcd'))} |")
    lines += ["", "### Floor: raw pyzmq fan-out", "",
              f"One PUB → N−1 subscriber processes, {doc['params']['floor_rate']:g} msg/s; ms until the last "
              "subscriber has the message. The floor waits in a blocking `recv()`; the agent-shaped floor reads as "
              "an agent does, with no dvswitch code: uvloop `add_reader` on the socket's FD, CURVE, and one small "
              "report to the publisher's process per wake-up that took a message (an agent's apply report).", "",
              "| hosts | receive loop | msgs | frame bytes | p50 | p90 | p99 | max | CPU µs/msg/subscriber | lost |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["per_hosts"]:
        for key, loop in (("floor", "blocking `recv()`"), ("floor_agent", "agent-shaped")):
            f = e.get(key)
            if f:
                d = f["latency_ms"]
                lines.append(f"| {e['hosts']} | {loop} | {f['msgs']} | {f['frame_bytes']} | {fmt(d['p50'])} | "
                             f"{fmt(d['p90'])} | {fmt(d['p99'])} | {fmt(d['max'])} | "
                             f"{fmt(f['cpu_us_per_msg_per_subscriber']['mean'], 0)} | {f['lost']} |")
    ets = [e for e in r["per_hosts"] if e.get("etcd")]
    if ets:
        v = ets[0]["etcd"]
        lines += ["", "### etcd: watched key-value store", "",
                  f"etcd {v.get('etcd_version') or '?'}, one member, data dir on "
                  f"{'tmpfs' if v.get('data_dir_on_tmpfs') else 'disk (no tmpfs here)'}; the bench puts values of the "
                  f"floor's frame size at {doc['params']['floor_rate']:g}/s (one after another, each waiting for its "
                  f"commit) to keys watched by N processes ({v.get('watcher_client', 'aetcd')} gRPC watch, one per host); ms from just before "
                  "the put until the last watcher is notified.", "",
                  "| hosts | watchers | puts | puts/s | value bytes | p50 | p90 | p99 | max | CPU µs/msg/watcher | lost |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in ets:
            et = e["etcd"]
            d = et["latency_ms"]
            lines.append(f"| {e['hosts']} | {et['watchers']} | {et['msgs']} | {fmt(et['achieved_puts_per_s'], 0)} | "
                         f"{et['frame_bytes']} | {fmt(d['p50'])} | {fmt(d['p90'])} | {fmt(d['p99'])} | {fmt(d['max'])} | "
                         f"{fmt(et['cpu_us_per_msg_per_watcher']['mean'], 0)} | {et['lost']} |")
    elif r.get("etcd_skipped"):
        lines += ["", "### etcd: watched key-value store", "", f"Not measured: {r['etcd_skipped']}."]
    lines += ["", "### Cost per move", "",
              "| hosts | msgs/move (control + gossip + applied + repair) | payload B/move | loopback B/move "
              "| agent CPU µs/move/receiver | controller CPU ms/move | idle heartbeats/s | idle mesh cores "
              "| agent RSS MB mean / max |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in r["per_hosts"]:
        m = e.get("moves")
        if not m:
            continue
        c = m["cost"]
        mm = c["msgs_per_move"]
        lo = c["loopback"]
        lines.append(
            f"| {e['hosts']} | {fmt(mm['total'], 1)} ({mm['control']} + {fmt(mm['gossip_updates'], 1)} + "
            f"{fmt(mm['applied_reports'], 1)} + {fmt(mm['repair'], 2)}) | {fmt(c['payload_bytes_per_move']['total'], 0)} | "
            f"{fmt(lo['bytes_per_move_minus_idle'], 0) if lo else '-'} | "
            f"{fmt(c['cpu']['agent_us_per_move_per_receiver'], 0)} {floor_cpus(e)} | "
            f"{fmt(c['cpu']['controller_ms_per_move'])} | "
            f"{fmt(c['background']['heartbeats_received_per_s_idle'], 0)} | "
            f"{fmt(c['background']['agents_cpu_cores_idle'])} | "
            f"{fmt(c['memory']['agent_rss_mb_mean'], 1)} / {fmt(c['memory']['agent_rss_mb_max'], 1)} |")
    lines += profile_markdown(r.get("profile"))
    load = r.get("load")
    if load:
        lines += ["", f"### Load curve at {load['hosts']} hosts", "",
                  "Open loop, concurrent moves; ms; (×) = ratio to the floor's and etcd's p99 of the same N "
                  "(both measured at their own fixed rate).", "",
                  "| offered /s | sent | converged | achieved /s | p50 | p99 | request→reply p99 | send lag p99 "
                  "| agents cores | controller cores | passes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in load["steps"]:
            lines.append(f"| {s['rate_per_s']:g} | {s['sent']} | {s['converged']} | {fmt(s['achieved_per_s'], 0)} | "
                         f"{fmt(s['latency_ms']['p50'])} | "
                         f"{with_ratios(s['latency_ms']['p99'], s.get('p99_vs_floor'), s.get('p99_vs_etcd'))} | "
                         f"{fmt(s['e2e_ms']['p99'])} | {fmt(s['send_lag_ms']['p99'])} | {fmt(s['agents_cpu_cores'])} | "
                         f"{fmt(s['controller_cpu_cores'])} | {'yes' if s['pass'] else 'no'} |")
    cold, ha = r.get("cold_start"), r.get("ha")
    if cold or ha:
        lines += ["", "### Mass events", "", "| event | figure | value |", "|---|---|---|"]
        if cold:
            ev = f"cold start: {cold['ports']:,} ports, {cold['hosts']} hosts"
            lines += [f"| {ev} | request → last agent applied | {fmt(cold['all_applied_ms'], 0)} ms |",
                      f"| | request → batch reply ({cold['reply_bytes'] / 1e6:.1f} MB) | {fmt(cold['reply_ms'], 0)} ms |",
                      f"| | ports applied by every agent / agents holding all | {cold['converged']:,} / "
                      f"{cold['agents_holding_all']} of {cold['hosts']} |",
                      f"| | ops the controller saw converge within its op timeout | "
                      f"{cold['controller_converged_ops']:,} |",
                      f"| | agent RSS MB mean / max / peak | {fmt(cold['agent_rss_mb_mean'], 1)} / "
                      f"{fmt(cold['agent_rss_mb_max'], 1)} / {fmt(cold['agent_peak_rss_mb_max'], 1)} |",
                      f"| | CPU s: per agent (mean) / controller | {fmt(cold['agent_cpu_s_mean'])} / "
                      f"{fmt(cold['controller_cpu_s'])} |"]
        if ha:
            ev = f"HA: SIGKILL {ha['victim']} with {ha['vms_on_victim']} VMs, {ha['hosts']} hosts"
            lines += [f"| {ev} | detection (controller dead after {ha['dead_after_ms']} ms) | "
                      f"{fmt(ha['detection_ms'], 0)} ms |",
                      f"| | restart convergence (first attach → last apply) | {fmt(ha['restart_convergence_ms'], 0)} ms |",
                      f"| | total: kill → all {ha['vms_on_victim']} run elsewhere, known everywhere | "
                      f"{fmt(ha['total_ms'], 0)} ms |",
                      f"| | restarted and converged / running elsewhere / tables agree | {ha['restarts_converged']} / "
                      f"{ha['running_elsewhere']} / {'yes' if ha['tables_agree'] else 'NO'} |"]
    if r.get("curve"):
        cv = r["curve"]
        lines += ["", "### CURVE on and off", "",
                  f"{cv['hosts']} hosts, {cv['moves_per_mode']} moves one after another with CURVE and as many "
                  f"without, on fresh clusters in {cv['rounds']} alternating rounds (goal: at most 10 % on p50 "
                  "and p99).", "", "| figure | CURVE | no CURVE | overhead |", "|---|---|---|---|"]
        lines += [f"| {a} | {b_} | {c} | {d} |" for a, b_, c, d in curve_rows(cv)]
    if r.get("balance"):
        lines += ["", "### Evacuate and rebalance", "", "| event | figure | value |", "|---|---|---|"]
        lines += [f"| {a} | {b_} | {c} |" for a, b_, c in balance_rows(r["balance"])]
    pngs = [Path(p).name for p in plot_files.values() if str(p).endswith(".png")]
    if pngs:
        lines += ["", "Plots written next to `bench.json` in the output directory: "
                  + ", ".join(f"`{p}`" for p in pngs) + "."]
    lines += ["", DEFINITIONS, SESSION_NOTES, SESSION_NOTES_1204, PROFILE_NOTES, EARLIER]
    return "\n".join(lines).rstrip() + "\n"
