"""`python -m controller`: the placement authority (VSM / vCenter role)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import fields

import zmq

from agent import clusterfile
from controller.config import ControllerConfig
from controller.core import NAME_RE
from controller.runtime import ControllerRuntime
from dvswitch import errors
from dvswitch.bus import install_uvloop, setup_logging, wildcard
from dvswitch.naming import host_names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller", description="dvswitch controller")
    p.add_argument("--bind", default=None, help="endpoint to bind (default: tcp://127.0.0.1:<ephemeral>)")
    p.add_argument("--bind-ip", default=None, help="address to bind an ephemeral port on (default 127.0.0.1)")
    p.add_argument("--cluster", default=None, metavar="FILE",
                   help="cluster file (TOML): bind its controller endpoint and admit its hosts (replaces "
                        "--bind, --bind-ip and --hosts)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE: the cluster's key directory (`dvs up` makes STATE_DIR/keys): the controller "
                        "uses DIR/controller.key_secret and accepts host keys (registrations, reports) and "
                        "the admin key (API requests). Default: none (no CURVE, with a warning)")
    p.add_argument("--insecure", action="store_true",
                   help="run without CURVE (what no --keys means, said explicitly); for comparison runs only")
    p.add_argument("--bind-wildcard", action="store_true",
                   help="allow a wildcard bind address (0.0.0.0 or *): every address of the machine")
    p.add_argument("--ready-fd", type=int, default=None, help="pipe fd to announce readiness on")
    p.add_argument("--journal", default=None, help="file to keep the inventory in (fsynced; replayed on start)")
    p.add_argument("--hosts", default="",
                   help="hosts to admit: a count N (h1..hN) or comma-separated names (default: none; the "
                        "journal keeps every host admitted before, `dvs host add` admits more)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="append what the controller does to FILE, one JSON object per line (`dvs events` "
                        "reads it); default: none")
    p.add_argument("--events-applies", action="store_true",
                   help="with --events: also every apply report row (apply.rows; the chaos runner's history)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus metrics on --bind-ip:PORT (default 0: an ephemeral port; -1: none)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process exits (the run that owns the cluster); default: never")
    for f in fields(ControllerConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        hosts = parse_hosts(args.hosts)
    except ValueError as e:
        p.error(str(e))
    if args.cluster is not None:
        given = [f for f, v in (("--bind", args.bind), ("--bind-ip", args.bind_ip), ("--hosts", hosts)) if v]
        if given:
            return errors.fail("controller", f"--cluster names the endpoint and the hosts itself; drop {given[0]}")
        try:
            spec = clusterfile.load(args.cluster)
        except ValueError as e:
            return errors.fail("controller", str(e))
        args.bind, hosts = spec.controller, list(spec.hosts)
    args.bind_ip = args.bind_ip or "127.0.0.1"
    bind_host = args.bind.removeprefix("tcp://").rsplit(":", 1)[0] if args.bind else args.bind_ip
    if wildcard(bind_host) and not args.bind_wildcard:
        print(f"controller: error: bind address {bind_host!r} is a wildcard (every address of this machine); "
              "give this machine's own address, or add --bind-wildcard if you mean it", file=sys.stderr)
        return 2
    if args.keys is not None and args.insecure:
        print("controller: error: --keys and --insecure contradict each other; drop one", file=sys.stderr)
        return 2
    setup_logging("controller", args.log_level)
    if args.keys is None:
        logging.getLogger("controller").warning("no --keys: no CURVE; anyone who reaches the controller's "
                                                "socket can register hosts and move VMs")
    config = ControllerConfig(**{f.name: getattr(args, f.name) for f in fields(ControllerConfig)})
    install_uvloop()
    try:
        return asyncio.run(ControllerRuntime(config, bind=args.bind, bind_ip=args.bind_ip, ready_fd=args.ready_fd,
                                             journal=args.journal, hosts=hosts, metrics_port=args.metrics_port,
                                             parent_pid=args.parent_pid, events_path=args.events,
                                             events_applies=args.events_applies, keys_dir=args.keys).run())
    except ValueError as e:  # a key directory or key file that cannot be used
        return errors.fail("controller", f"{e}; `dvs up` creates the keys", errors.EXIT_USAGE)
    except zmq.ZMQError as e:
        # (a bind that is no endpoint, or one in use: the launcher shows this line)
        return errors.fail("controller", f"cannot bind {args.bind or args.bind_ip!r}: {e}; give an endpoint such as "
                                         "tcp://127.0.0.1:5555")
    except OSError as e:
        return errors.fail("controller", f"journal {args.journal}: {e.strerror or e}; fix or move it")


def parse_hosts(text: str) -> list[str]:
    """`--hosts 3` -> h1, h2, h3; `--hosts h1,h7` -> those."""
    text = text.strip()
    if not text:
        return []
    if text.isdigit():
        return host_names(int(text))
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if not NAME_RE.match(n)]
    if bad:
        raise ValueError(f"--hosts: bad host name {bad[0]!r}: use letters, digits, '-', '_' or '.', at most 64")
    return names


if __name__ == "__main__":
    sys.exit(main())
