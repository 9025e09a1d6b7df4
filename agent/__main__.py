"""`python -m agent --host h1 --controller tcp://127.0.0.1:PORT`: one simulated hypervisor.
`python -m agent --cluster FILE --host h1`: one host of a cluster file (agent/clusterfile.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import fields

import zmq

from agent import clusterfile
from agent.config import AgentConfig
from agent.dataplane import DataplaneConfig
from agent.dpruntime import VtepMap
from agent.runtime import AgentRuntime
from agent.vxlan import VXLAN_PORT
from dvswitch import errors
from dvswitch.bus import install_uvloop, setup_logging, wildcard

# Flags a cluster file answers itself; giving one beside --cluster would be a second source of truth.
CLUSTER_OWNS = ("controller", "bind_ip", "vtep_base", "vteps")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m agent", description="dvswitch agent (one host)")
    p.add_argument("--host", required=True, help="host id, e.g. h1")
    p.add_argument("--cluster", default=None, metavar="FILE",
                   help="cluster file (TOML): the controller's endpoint, this host's control address (its "
                        "sockets bind there only) and every host's VTEP; replaces --controller, --bind-ip, "
                        "--vtep-base and --vteps")
    p.add_argument("--controller", default=None, help="controller endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--bind-ip", default=None, help="address to bind sockets on (default 127.0.0.1)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE: the cluster's key directory (dvswitch/keys.py; `dvs up` makes STATE_DIR/keys); "
                        "this agent uses DIR/HOST.key_secret, accepts the keys in DIR, pins the controller's "
                        "and its peers'. Default: none (no CURVE, as --insecure, with a warning)")
    p.add_argument("--insecure", action="store_true",
                   help="run without CURVE (what no --keys means, said explicitly): anyone who reaches the "
                        "sockets may command this agent; for comparison runs only")
    p.add_argument("--bind-wildcard", action="store_true",
                   help="allow --bind-ip to be a wildcard (0.0.0.0): every address of the machine")
    p.add_argument("--ready-fd", type=int, default=None, help="pipe fd to announce readiness on")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault-injection RNG (default 0)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="append what the agent does to FILE, one JSON object per line (`dvs events` reads it); "
                        "default: none")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus metrics on --bind-ip:PORT (default 0: an ephemeral port; -1: none)")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process exits (the run that owns the cluster); default: never")
    p.add_argument("--vtep-base", default=None,
                   help="data plane: host hN's VTEP is this IPv4 address + N (default 127.0.0.1, so h1 is "
                        "127.0.0.2); 'off' disables the data plane")
    p.add_argument("--vtep-port", type=int, default=VXLAN_PORT, help="VXLAN UDP port (default 4789)")
    p.add_argument("--vteps", default=None, metavar="FILE",
                   help="data plane: a JSON object {host: IPv4 address} naming every host's VTEP explicitly "
                        "(overrides --vtep-base; re-read when it names a host or address not seen before)")
    p.add_argument("--vm-netns", default=None, metavar="PREFIX",
                   help="TAP vNICs: VM v is the network namespace PREFIX+v with a multi-queue TAP `eth0`; this "
                        "agent attaches a queue for every VM whose port is on this host (root, /dev/net/tun)")
    for f in [*fields(AgentConfig), *fields(DataplaneConfig)]:
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", default=f.default)
        else:
            p.add_argument(flag, type=int, default=f.default)
    return p.parse_args(argv)


def fail(msg: str) -> int:
    return errors.fail("agent", msg, errors.EXIT_USAGE)


def _spec_vteps(path) -> dict[str, str]:
    return clusterfile.load(path).vteps()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    pub_port = rpc_port = 0
    vteps = None
    if args.cluster is not None:
        given = [n for n in CLUSTER_OWNS if getattr(args, n) is not None]
        if given:
            return fail(f"--cluster names the addresses itself; drop --{given[0].replace('_', '-')}")
        try:
            spec = clusterfile.load(args.cluster)
            me = spec.host(args.host, args.cluster)
            vteps = VtepMap(args.cluster, read=_spec_vteps)
        except ValueError as e:
            return fail(f"{e}")
        args.controller, args.bind_ip = spec.controller, me.control
        pub_port, rpc_port = me.pub_port, me.rpc_port
        vtep_base = None
    else:
        if args.controller is None:
            return fail("give --controller ENDPOINT (or --cluster FILE)")
        args.bind_ip = args.bind_ip or "127.0.0.1"
        vtep_base = args.vtep_base or "127.0.0.1"
        vtep_base = None if vtep_base == "off" else vtep_base
        if args.vteps is not None:
            try:
                vteps = VtepMap(args.vteps)
            except ValueError as e:
                return fail(f"{e}; pass a JSON object {{host: IPv4 address}}")
    if wildcard(args.bind_ip) and not args.bind_wildcard:
        return fail(f"--bind-ip {args.bind_ip} is a wildcard (every address of this machine); give this host's "
                    "own address, or add --bind-wildcard if you mean it")
    if args.keys is not None and args.insecure:
        return fail("--keys and --insecure contradict each other; drop one")
    setup_logging(f"agent[{args.host}]", args.log_level)
    if args.keys is None:
        logging.getLogger("agent").warning("--insecure: no CURVE; anyone who reaches this agent's sockets "
                                           "can claim MACs, inject faults and command it")
    config = AgentConfig(**{f.name: getattr(args, f.name) for f in fields(AgentConfig)})
    dp_config = DataplaneConfig(**{f.name: getattr(args, f.name) for f in fields(DataplaneConfig)})
    install_uvloop()
    rt = AgentRuntime(args.host, args.controller, config, bind_ip=args.bind_ip, ready_fd=args.ready_fd,
                      fault_seed=args.fault_seed, vtep_base=vtep_base, vtep_port=args.vtep_port,
                      dp_config=dp_config, vteps=vteps, vm_netns=args.vm_netns, pub_port=pub_port,
                      rpc_port=rpc_port, metrics_port=args.metrics_port, parent_pid=args.parent_pid,
                      events_path=args.events, keys_dir=args.keys)
    try:
        return asyncio.run(rt.run())
    except ValueError as e:  # a key directory or key file that cannot be used
        return fail(f"{e}; `dvs up` creates the keys (or `dvs keys show` lists them)")
    except zmq.ZMQError as e:
        # (an address not on this machine, or a fixed port in use: the launcher shows this line)
        return fail(f"cannot bind the control sockets on {args.bind_ip}: {e}; use an address of this machine "
                    "and free ports")


if __name__ == "__main__":
    sys.exit(main())
