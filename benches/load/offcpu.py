#!/usr/bin/env python3
"""When a pinned proxy's thread was off its CPU during a load run, and what ran instead.

Reads `perf script -F time,event,trace` of a `perf record -e sched:sched_switch -C CPU`
recording and follows one thread (by pid; default: the thread switched out most often):
every stretch from its switch-out to its return is either a wait (it slept in epoll_wait:
nothing was ready for it) or a preemption (it was runnable; another task had the CPU).
A latency tail that both proxies share comes from these, not from the proxy's own work.

Usage: offcpu.py SCRIPT_OUTPUT [PID] [TOP]
"""

import collections
import re
import sys

SWITCH = re.compile(
    r"\s*([\d.]+): sched:sched_switch: prev_comm=(.*?) prev_pid=(\d+) .*?prev_state=(\S+)"
    r" ==> next_comm=(.*?) next_pid=(\d+)"
)


def main() -> None:
    events = []
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        for line in f:
            m = SWITCH.match(line)
            if m:
                t, prev_comm, prev_pid, state, next_comm, next_pid = m.groups()
                events.append((float(t), prev_comm, prev_pid, state, next_comm, next_pid))
    if not events:
        sys.exit("offcpu: no sched_switch events")
    pid = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    if pid is None:
        pid = collections.Counter(e[2] for e in events if e[2] != "0").most_common(1)[0][0]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 8

    stretches = []  # (ms, kind, start offset s, who ran)
    out = None
    ran = collections.Counter()
    preemptors = collections.Counter()
    for t, _, prev_pid, state, next_comm, next_pid in events:
        if prev_pid == pid:
            out = (t, "wait" if state.startswith(("S", "D", "I")) else "preempted")
            ran = collections.Counter()
        if out is None:
            continue
        if next_pid == pid:
            stretches.append(((t - out[0]) * 1000, out[1], out[0] - events[0][0], dict(ran)))
            if out[1] == "preempted":
                preemptors.update(ran)
            out = None
        elif next_comm != "swapper/0" or out[1] == "preempted":
            ran[next_comm] += 1

    span = events[-1][0] - events[0][0]
    print(f"thread {pid}: {len(stretches)} stretches off CPU in {span:.1f} s")
    for kind in ("wait", "preempted"):
        ms = [s[0] for s in stretches if s[1] == kind]
        over1 = sum(1 for m in ms if m >= 1.0)
        print(f"  {kind:9} {len(ms):6} times, {sum(ms):8.1f} ms in all, {over1:4} of them >= 1 ms")
    print("  preempted by (switches to):", ", ".join(f"{c} {n}" for c, n in preemptors.most_common(6)) or "-")
    print(f"  longest {top}:")
    for ms, kind, at, who in sorted(stretches, key=lambda s: -s[0])[:top]:
        others = ", ".join(f"{c}" for c in who) or "-"
        print(f"    {ms:7.3f} ms {kind:9} at {at:6.3f} s; ran meanwhile: {others}")


if __name__ == "__main__":
    main()
