#!/usr/bin/env python3
"""The code a request runs: distinct instructions and 64-byte cache lines, per function.

Reads a callgrind dump taken with --dump-instr=yes (instructions.sh with KEEP=1 and
CALLGRIND_ARGS=--dump-instr=yes, for Meridian or with NGINX=1 for NGINX too) and counts
the instructions executed at least 0.9 times per request: the code every request walks,
which is what has to fit the 32 KiB instruction cache beside the kernel's own path. Prints
the totals, then the functions with the most cache lines.

Usage: benches/load/code_footprint.py DUMP REQUESTS [TOP]
"""

import collections
import re
import sys

NAMED = re.compile(r"\((\d+)\)(?: (.*))?")


def position(token, current):
    """A callgrind position: absolute, relative (+n, -n) or the same (*)."""
    if token == "*":
        return current
    if token[0] in "+-":
        return current + int(token, 0)
    return int(token, 0)


def main():
    dump, requests = sys.argv[1], int(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    names = {"ob": {}, "fn": {}}
    executed = collections.Counter()
    function_of = {}
    obj = fn = None
    addr = 0
    after_call = False
    positions = 1
    with open(dump) as f:
        for raw in f:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            if raw.startswith("positions:"):
                positions = len(raw.split()) - 1
                continue
            key, _, value = raw.partition("=")
            if key in ("ob", "cob", "fn", "cfn"):
                kind = key[-2:]
                m = NAMED.match(value)
                if m and m.group(2):
                    names[kind][m.group(1)] = m.group(2)
                name = names[kind].get(m.group(1), "?") if m else value
                if key == "ob":
                    obj = name
                elif key == "fn":
                    fn = name
                continue
            if key == "calls":
                after_call = True
                continue
            if raw[0].isdigit() or raw[0] in "+-*":
                fields = raw.split()
                addr = position(fields[0], addr)  # the rest: a line position, then events
                if after_call:
                    # The call's inclusive cost, not an instruction of this function.
                    after_call = False
                    continue
                if len(fields) > positions:
                    executed[(obj, addr)] += int(fields[positions])  # Ir, the first event
                function_of[(obj, addr)] = fn
    hot = [a for a, n in executed.items() if n >= 0.9 * requests]
    lines = {}
    for obj_addr in hot:
        lines.setdefault((obj_addr[0], obj_addr[1] // 64), function_of[obj_addr])
    print(f"{len(hot)} distinct instructions in {len(lines)} cache lines a request")
    per_fn = collections.Counter(lines.values())
    instrs = collections.Counter(function_of[a] for a in hot)
    for name, n in per_fn.most_common(top):
        print(f"  {n:5d} lines {instrs[name]:6d} instructions  {name[:100]}")


if __name__ == "__main__":
    main()
