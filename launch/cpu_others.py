"""How much CPU other programs took while a benchmark ran (launch/cpu_peer.sh): on a shared machine a figure
taken while something else ran is no figure. Linux only (/proc).

  python cpu_others.py PID > SNAPSHOT        before: CPU seconds used so far by each process that is not PID's
  python cpu_others.py PID SNAPSHOT LIMIT    after: prints their share of the machine meanwhile (% of all cores
                                             over the wall time); exit 3 if it is above LIMIT percent

PID's own processes (its descendants, and any process whose environment has CPU_OTHERS_MARK as the caller's:
an orphan that pid 1 adopted) and its ancestors (whose counters take in what they reap) are left out;
every other process counts with its children's time (utime + stime + cutime + cstime), so short-lived programs
count too once their parent has reaped them; a process that ended in between had its earlier time moved into
its parent's counters, and that is taken off again. SNAPSHOT is JSON: the time and each such process's seconds.
"""

import json
import os
import sys
import time

# set by the caller (to its PID): every process it starts inherits it, even one orphaned and adopted by pid 1
MARK = "CPU_OTHERS_MARK"


def processes() -> dict[int, tuple[int, float, bool, bool]]:
    """pid -> (parent pid, CPU seconds of it and its reaped children, whether it carries MARK in its environment,
    whether it is a zombie: ended, its environment gone, its time not yet handed to its parent)."""
    tick, mark, out = os.sysconf("SC_CLK_TCK"), f"{MARK}={os.environ.get(MARK, '-')}".encode(), {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                marked = mark in f.read().split(b"\0")
        except OSError:  # another user's
            marked = False
        out[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick, marked, fields[0] == "Z")
    return out


def others(pid: int) -> dict[int, float]:
    """CPU seconds of every process that is not PID's, by pid."""
    procs = processes()
    mine = {p for p, (_, _, marked, _) in procs.items() if marked} | {pid}
    grown = True
    while grown:  # PID's descendants
        grown = {p for p, (parent, *_) in procs.items() if parent in mine and p not in mine}
        mine |= grown
    # its ancestors, up to pid 1 (which reaps orphans: left out too)
    ancestor = pid
    while ancestor in procs and ancestor > 1:
        ancestor = procs[ancestor][0]
        mine.add(ancestor)
    # a zombie of ours that pid 1 adopted (a rank whose parent exited first) no longer shows the mark
    mine |= {p for p, (parent, _, _, zombie) in procs.items() if zombie and parent in mine}
    return {p: cpu for p, (_, cpu, _, _) in procs.items() if p not in mine}


def main(argv: list[str]) -> int:
    pid, now = int(argv[0]), time.monotonic()
    if len(argv) == 1:
        print(json.dumps({"time": now, "cpu": others(pid)}))
        return 0
    with open(argv[1]) as f:
        before = json.load(f)
    start, cpu = before["time"], {int(p): s for p, s in before["cpu"].items()}
    after = others(pid)
    # what the processes alive now used since (a new one: all of it), less what the ones that ended had used
    # before: their parents' counters took that in when they reaped them
    used = sum(s - cpu.get(p, 0.0) for p, s in after.items()) - sum(
        s for p, s in cpu.items() if p not in after
    )
    share = 100 * used / max(1e-9, (now - start) * os.cpu_count())
    print(f"{share:.1f}")
    return 3 if share > float(argv[2]) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
