#!/usr/bin/env python3
"""Self cost per instruction in a callgrind dump, summed by function or listed by site.

For a dump made with `--dump-instr=yes` (and `--cache-sim=yes` for miss events), e.g. by
`KEEP=1 CALLGRIND_ARGS="--cache-sim=yes --dump-instr=yes ..." benches/load/instructions.sh`:
prints EVENT per request summed over the functions whose name contains SUBSTRING, then the
TOP instruction addresses by that event (match them with `objdump -d`). Costs of calls are
left out: each instruction counts only what it did itself.

Usage: self_misses.py DUMP REQUESTS EVENT TOP [SUBSTRING]   (EVENT: Ir, DLmr, DLmw, D1mw...)
"""
import collections
import re
import sys

NAME = re.compile(r"\((\d+)\)(?: (.*))?")


def main() -> None:
    dump, requests, event, top = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    substring = sys.argv[5] if len(sys.argv) > 5 else ""
    names: dict[str, str] = {}

    def name(token: str) -> str:
        # Callgrind compresses names: "(7) full name" once, "(7)" after that.
        m = NAME.match(token)
        if not m:
            return token
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), "?")

    def step(token: str, current: int) -> int:
        # Positions are absolute, relative (+N, -N) or unchanged (*).
        if token == "*":
            return current
        if token[0] in "+-":
            return current + int(token, 0)
        return int(token, 0)

    events: list[str] = []
    npos = 1
    positions = [0, 0]
    function = ""
    after_call = False
    cost = collections.defaultdict(lambda: [0] * 16)
    with open(dump, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("positions:"):
                npos = len(line.split()) - 1
            elif line.startswith("fn="):
                function = name(line[3:])
            elif line.startswith("cfn="):
                name(line[4:])
            elif line.startswith("calls="):
                # The next cost line is the call's inclusive cost, not this function's.
                after_call = True
            elif line[0].isdigit() or line[0] in "+-*":
                fields = line.split()
                for i in range(npos):
                    positions[i] = step(fields[i], positions[i])
                if not after_call:
                    row = cost[(function, positions[0])]
                    for i, v in enumerate(fields[npos:]):
                        row[i] += int(v)
                after_call = False
    column = events.index(event)
    rows = [(k, v) for k, v in cost.items() if substring in k[0]]
    total = sum(v[column] for _, v in rows)
    print(f"total {event}/req in '{substring}': {total / requests:.2f}")
    rows.sort(key=lambda kv: -kv[1][column])
    for (fn, address), v in rows[:top]:
        print(f"{v[column] / requests:6.2f} {hex(address)} Ir/req={v[0] / requests:.2f} {fn[:60]}")


if __name__ == "__main__":
    main()
