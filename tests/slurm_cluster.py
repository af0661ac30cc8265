"""A real SLURM cluster on this machine, for the tests: 2 nodes in network namespaces, private daemons.

`slurm_cluster` (session scope) installs Debian's slurmctld / slurmd / slurm-client / munge / iproute2
when they are missing, writes its own slurm.conf in a temp dir, starts its own munged (own key and
socket), slurmctld on the host and one slurmd per node, each node in its own network namespace
(hostname nodeI, address 10.254.X.(10+I), a bridge at 10.254.X.1 on the host), and takes it all down
afterwards. It skips, with the reason, only where that cannot work (not root, not Linux, nothing to
install with). Everything it starts is stopped by the pid in its pid file, never by name.

Facts this follows (found on Debian 12, slurm-wlm 22.05.8, see shared notes): daemon stdio goes to
files (a daemon holding our pipe hangs `subprocess.run(capture_output=True)`); `AuthInfo=cred_expire=10`
(else a requeued job waits 121 s); slurmd is started with `nsenter --net` + `unshare --uts --mount`,
not `ip netns exec` (which hides /sys/fs/cgroup and slurmd dies); `sbatch --wait` polls slowly, so
jobs are polled with `scontrol show job -o`; a leftover slurmstepd ignores SIGTERM and has slurmd's
log dir as its working directory; an `unreachable 10.254.0.0/16` route keeps test traffic on the machine.

Run it by hand: `python -m tests.slurm_cluster` starts a cluster and prints how to use it until ^C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged", "ip", "nsenter", "unshare"]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


class Unavailable(Exception):
    """This machine cannot run the cluster (the reason is the message): the tests skip."""


def sh(*cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a short command with its stdin closed and its output captured (never a daemon: see module doc)."""
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, **kw
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def install_packages() -> None:
    """apt-get install what is missing (after an `apt-get update` if the first try fails)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if not shutil.which("apt-get"):
        raise Unavailable(f"SLURM is not installed and there is no apt-get to install {' '.join(PACKAGES)}")
    cmd = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=120",
        *PACKAGES,
    ]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = sh(*cmd, check=False, timeout=600, env=env)
    if proc.returncode != 0:
        sh("apt-get", "update", "-q", check=False, timeout=600, env=env)
        proc = sh(*cmd, check=False, timeout=600, env=env)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise Unavailable(
            f"could not install {' '.join(PACKAGES)} (missing {missing}): "
            f"{(proc.stderr or proc.stdout).strip()[-300:]}"
        )


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (slowly reaped here) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_pid(pid: int, timeout: float = 10) -> None:
    """SIGTERM, wait, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if not pid_alive(pid):
            return


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_for(what: str, check, timeout: float, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tails = "".join(f"\n--- {p} ---\n" + p.read_text(errors="replace")[-2000:] for p in logs if p.exists())
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}{tails}")


class SlurmCluster:
    """`nodes` slurmd in network namespaces + slurmctld + munged, all private to `root` (a temp dir)."""

    def __init__(self, root: Path, nodes: int = 2):
        self.root, self.nodes = Path(root), nodes
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.tag = f"rd{os.getpid() % 100000}"  # names of our bridge / namespaces / veths (<= 15 chars)
        self.bridge = f"{self.tag}br"
        self.netns = [f"{self.tag}n{i}" for i in range(1, nodes + 1)]
        self.node_names = [f"node{i}" for i in range(1, nodes + 1)]
        self.subnet: str | None = None  # "10.254.X"
        self.route_added = False
        self.started: list[Path] = []  # pid files of the daemons we started, in start order

    # ---- bring up ------------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        for d in ("state", "spool", "run", "log", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        (self.root / "owner").write_text(f"{os.getpid()} {self.tag}\n")  # for reap_stale() after a crash
        try:
            self._start_munge()
            self._start_network()
            self._write_conf()
            self._daemon(
                "slurmctld", ["slurmctld", "-f", str(self.conf)], self.root / "run" / "slurmctld.pid"
            )
            wait_for(
                "slurmctld",
                lambda: "UP" in self.scontrol("ping", check=False).stdout,
                30,
                [self.log_dir / "slurmctld.log"],
            )
            for name, ns in zip(self.node_names, self.netns):
                inner = (
                    f"hostname {name} && mount --bind {self.root / 'hosts'} /etc/hosts && "
                    f"exec slurmd -f {self.conf} -N {name}"
                )
                self._daemon(
                    f"slurmd-{name}",
                    [
                        "nsenter",
                        f"--net=/run/netns/{ns}",
                        "unshare",
                        "--uts",
                        "--mount",
                        "--propagation",
                        "private",
                        "sh",
                        "-c",
                        inner,
                    ],
                    self.root / "run" / f"slurmd-{name}.pid",
                )
            wait_for(
                "the nodes to be idle",
                self._all_idle,
                60,
                [self.log_dir / f"slurmd-{n}.log" for n in self.node_names]
                + [self.log_dir / "slurmctld.log"],
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        """A private munged: own key and socket (named in AuthInfo), so a system munge is left alone."""
        m = self.root / "munge"
        os.chmod(m, 0o755)  # clients of any user must reach the socket
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        # --force: munged refuses to run as root otherwise; here everything (slurm too) runs as root
        self._daemon(
            "munged",
            [
                "munged",
                "--force",
                f"--socket={m / 'socket'}",
                f"--key-file={key}",
                f"--log-file={m / 'munged.log'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--seed-file={m / 'seed'}",
            ],
            m / "munged.pid",
        )
        wait_for(
            "munged",
            lambda: (
                sh(
                    "sh", "-c", f"munge -S {m / 'socket'} -n | unmunge -S {m / 'socket'}", check=False
                ).returncode
                == 0
            ),
            15,
            [m / "munged.log"],
        )

    def _start_network(self) -> None:
        """A bridge on the host and one namespace per node, joined by veth pairs; nothing routed outside."""
        used = set(re.findall(r"10\.254\.(\d+)\.", sh("ip", "-o", "addr").stdout))
        start = os.getpid() % 150  # two sessions starting at once are unlikely to pick the same subnet
        free = [x for x in (101 + (start + i) % 150 for i in range(150)) if str(x) not in used]
        self.subnet = f"10.254.{free[0]}"
        sh(
            "ip", "route", "replace", "unreachable", "10.254.0.0/16"
        )  # nothing for 10.254/16 leaves the machine
        self.route_added = True
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        hosts = ["127.0.0.1 localhost", f"{self.subnet}.1 {socket.gethostname()}"]
        for i, (name, ns) in enumerate(zip(self.node_names, self.netns), start=1):
            host_end, node_end = f"{self.tag}h{i}", f"{self.tag}v{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            sh("ip", "link", "set", host_end, "master", self.bridge, "up")
            sh("ip", "link", "set", node_end, "netns", ns)
            for cmd in (
                ["link", "set", node_end, "name", "eth0"],
                ["addr", "add", f"{self.subnet}.{10 + i}/24", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
                ["link", "set", "lo", "up"],
            ):
                sh("ip", "-n", ns, *cmd)
            hosts.append(f"{self.subnet}.{10 + i} {name}")
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")

    def _write_conf(self) -> None:
        hw = sh("slurmd", "-C").stdout.split("\n")[0]
        fields = dict(kv.split("=", 1) for kv in hw.split() if "=" in kv)
        node_hw = " ".join(
            f"{k}={fields[k]}"
            for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
            if k in fields
        )
        r = self.root
        with socket.socket() as s:  # the controller's port: free, so a second cluster here does not collide
            s.bind(("", 0))
            port = s.getsockname()[1]
        lines = [
            "ClusterName=resnetdist",
            f"SlurmctldHost={socket.gethostname()}({self.subnet}.1)",
            f"SlurmctldPort={port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=10: a requeued job may start again after 11 s instead of 121 s
            f"AuthInfo=socket={r / 'munge' / 'socket'},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=5",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            *(
                f"NodeName={n} NodeHostname={n} NodeAddr={self.subnet}.{10 + i} {node_hw} State=UNKNOWN"
                for i, n in enumerate(self.node_names, start=1)
            ),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, name: str, cmd: list[str], pid_file: Path) -> None:
        """Start a forking daemon with stdio on files, wait for its pid file, remember it for stop()."""
        pid_file.unlink(missing_ok=True)
        out = self.log_dir / f"{name}.stdio"
        with open(out, "ab") as f:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=f,
                timeout=60,
                env={**os.environ, "SLURM_CONF": str(self.conf)},
            )
        self.started.append(pid_file)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start ({proc.returncode}): {out.read_text()[-2000:]}")
        wait_for(f"{name}'s pid file", lambda: read_pid(pid_file) is not None, 15, [out])

    def _all_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return len(states) == self.nodes and all(s == "idle" for s in states)

    # ---- use -----------------------------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        """`base` (default: this process's environment) plus SLURM_CONF pointing at this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None, cwd=None
    ) -> subprocess.CompletedProcess:
        return sh(*cmd, check=check, timeout=timeout, env=self.env(env), cwd=cwd)

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args, check=check)

    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> str:
        """Submit; returns the job id."""
        return self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.scontrol("show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=lambda j: j.get("JobState") in TERMINAL) -> dict:
        """Poll the job (every 0.25 s, much faster than `sbatch --wait`) until `until(job)`; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            j = self.job(job_id)
            if until(j):
                return j
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {j.get('JobState')} after {timeout:.0f}s: {j}")
            time.sleep(0.25)

    # ---- take down -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every daemon we started (by pid file, newest first), then our job leftovers and the network."""
        for pid_file in reversed(self.started):
            pid = read_pid(pid_file)
            if pid is not None:
                stop_pid(pid)
        self.started.clear()
        for pid in self._leftover_stepds():
            stop_pid(pid, timeout=2)
        for ns in self.netns:
            sh("ip", "netns", "delete", ns, check=False)  # deleting a namespace deletes its veth pair
        sh("ip", "link", "delete", self.bridge, check=False)
        if self.route_added and not re.search(r"10\.254\.\d+\.", sh("ip", "-o", "addr", check=False).stdout):
            sh("ip", "route", "delete", "unreachable", "10.254.0.0/16", check=False)
        self.route_added = False

    def _leftover_stepds(self) -> list[int]:
        """slurmstepd processes of our jobs: they ignore SIGTERM, retitle themselves, and live in our log dir."""
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if Path(os.readlink(p / "cwd")) == self.log_dir:
                        pids.append(int(p.name))
                except OSError:
                    pass
        return pids


def reap_stale() -> None:
    """Take down what a killed test session left behind (its owner process is gone): daemons, network, files."""
    for root in Path(tempfile.gettempdir()).glob("resnet-dist-slurm-*"):
        try:
            pid, tag = (root / "owner").read_text().split()
        except (OSError, ValueError):
            continue
        if pid_alive(int(pid)):
            continue
        stale = SlurmCluster(root)
        stale.tag, stale.bridge = tag, f"{tag}br"
        stale.netns = [f"{tag}n{i}" for i in range(1, stale.nodes + 1)]
        stale.started = [
            root / "munge" / "munged.pid",
            root / "run" / "slurmctld.pid",
            *sorted((root / "run").glob("slurmd-*.pid")),
        ]
        stale.route_added = True
        stale.stop()
        shutil.rmtree(root, ignore_errors=True)


def start_cluster(root: Path, nodes: int = 2) -> SlurmCluster:
    """Install if needed and start; raises Unavailable where this machine cannot run a cluster."""
    if not hasattr(os, "geteuid") or not Path("/proc/self").exists():
        raise Unavailable("the local SLURM cluster needs Linux")
    if os.geteuid() != 0:
        raise Unavailable(
            "the local SLURM cluster needs root (to install SLURM, run its daemons as root "
            "and create network namespaces); run the tests as root, or with -m 'not slurm'"
        )
    reap_stale()
    install_packages()
    probe = f"rd{os.getpid() % 100000}probe"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        raise Unavailable("cannot create network namespaces here (no CAP_NET_ADMIN?)")
    sh("ip", "netns", "delete", probe, check=False)
    return SlurmCluster(root, nodes).start()


@pytest.fixture(scope="session")
def slurm_cluster():
    """One 2-node cluster for all SLURM tests of the session; taken down (and its temp dir removed) at the end."""
    root = Path(tempfile.mkdtemp(prefix="resnet-dist-slurm-"))
    try:
        cluster = start_cluster(root)
    except Unavailable as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    c = start_cluster(Path(tempfile.mkdtemp(prefix="resnet-dist-slurm-")))
    print(f"up: export SLURM_CONF={c.conf}   (logs in {c.log_dir}); ^C or SIGTERM stops it", flush=True)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)
