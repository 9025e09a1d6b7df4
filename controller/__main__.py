"""`python -m controller`: the placement authority (VSM / vCenter role)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import fields

from agent.zmqloop import install_uvloop, setup_logging
from controller.config import ControllerConfig
from controller.runtime import ControllerRuntime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller", description="dvswitch controller")
    p.add_argument("--bind", default=None, help="endpoint to bind (default: tcp://127.0.0.1:<ephemeral>)")
    p.add_argument("--bind-ip", default="127.0.0.1")
    p.add_argument("--ready-fd", type=int, default=None, help="pipe fd to announce readiness on")
    p.add_argument("--journal", default=None, help="file to keep the inventory in (fsynced; replayed on start)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus metrics on --bind-ip:PORT (default 0: an ephemeral port; -1: none)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process exits (the run that owns the cluster); default: never")
    for f in fields(ControllerConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging("controller", args.log_level)
    config = ControllerConfig(**{f.name: getattr(args, f.name) for f in fields(ControllerConfig)})
    install_uvloop()
    return asyncio.run(ControllerRuntime(config, bind=args.bind, bind_ip=args.bind_ip,
                                         ready_fd=args.ready_fd, journal=args.journal,
                                         metrics_port=args.metrics_port, parent_pid=args.parent_pid).run())


if __name__ == "__main__":
    sys.exit(main())
