"""`python -m controller`: the placement authority (VSM / vCenter role)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import fields

import zmq

from agent import clusterfile
from agent.zmqloop import install_uvloop, setup_logging
from controller.config import ControllerConfig
from controller.core import NAME_RE
from controller.runtime import ControllerRuntime
from dvswitch import errors
from dvswitch.naming import host_names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller", description="dvswitch controller")
    p.add_argument("--bind", default=None, help="endpoint to bind (default: tcp://127.0.0.1:<ephemeral>)")
    p.add_argument("--bind-ip", default=None, help="address to bind an ephemeral port on (default 127.0.0.1)")
    p.add_argument("--cluster", default=None, metavar="FILE",
                   help="cluster file (TOML): bind its controller endpoint and admit its hosts (replaces "
                        "--bind, --bind-ip and --hosts)")
    p.add_argument("--ready-fd", type=int, default=None, help="pipe fd to announce readiness on")
    p.add_argument("--journal", default=None, help="file to keep the inventory in (fsynced; replayed on start)")
    p.add_argument("--hosts", default="",
                   help="hosts to admit: a count N (h1..hN) or comma-separated names (default: none; the "
                        "journal keeps every host admitted before, `dvs host add` admits more)")
    p.add_argument("--log-level", default="info")
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
    setup_logging("controller", args.log_level)
    config = ControllerConfig(**{f.name: getattr(args, f.name) for f in fields(ControllerConfig)})
    install_uvloop()
    try:
        return asyncio.run(ControllerRuntime(config, bind=args.bind, bind_ip=args.bind_ip, ready_fd=args.ready_fd,
                                             journal=args.journal, hosts=hosts, metrics_port=args.metrics_port,
                                             parent_pid=args.parent_pid).run())
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
