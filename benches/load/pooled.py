#!/usr/bin/env python3
"""Pools the throughput rounds of several compare.sh runs into one estimate per count.

Usage: benches/load/pooled.py [--proxy meridian] [--phase throughput] OUT/runs.tsv...

Each round of a run measures every proxy once at each connection count; the ratio of
NGINX's CPU-seconds per request to the proxy's in the same round is one paired sample (the
"paired" column of compare.sh's summary). One run of five or seven rounds cannot tell a
1 % difference from the host's ±3 % spread; the rounds of several runs (best with the
proxies' order swapped between them) give a mean with a 95 % interval (two standard errors)
that can: when the interval holds 1.0, the proxy is level with NGINX at this resolution.
"""

import argparse
import math
import statistics


def samples(paths, proxy, phase):
    """Paired ratios per connection count, over every round of every run."""
    by_count = {}
    for path in paths:
        cpu = {}
        with open(path, encoding="utf-8") as runs:
            for line in runs:
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 7 or fields[0] != phase:
                    continue
                cpu.setdefault((fields[1], fields[2]), []).append(float(fields[6]))
        for (name, conns), mine in cpu.items():
            if name != proxy:
                continue
            nginx = cpu.get(("nginx", conns), [])
            pairs = [n / m for m, n in zip(mine, nginx) if m > 0]
            by_count.setdefault(conns, []).extend(pairs)
    return by_count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy", default="meridian")
    parser.add_argument("--phase", default="throughput")
    parser.add_argument("runs", nargs="+", help="runs.tsv files of compare.sh runs")
    args = parser.parse_args()
    by_count = samples(args.runs, args.proxy, args.phase)
    if not by_count:
        raise SystemExit(f"no {args.phase} rounds of {args.proxy} beside nginx")
    print(f"{args.proxy}: NGINX CPU-s per request over its own, per round, pooled over {len(args.runs)} run(s)")
    for conns in sorted(by_count, key=lambda c: (len(c), c)):
        xs = by_count[conns]
        mean = statistics.mean(xs)
        if len(xs) > 1:
            half = 2 * statistics.stdev(xs) / math.sqrt(len(xs))
            interval = f"95 % interval {mean - half:.3f}-{mean + half:.3f}"
        else:
            interval = "one round: no interval"
        below = sum(x < 1.0 for x in xs)
        print(
            f"{conns:>6} conns: {len(xs)} rounds, mean {mean:.3f}, median {statistics.median(xs):.3f}, "
            f"{interval}, rounds below 1.0: {below}"
        )


if __name__ == "__main__":
    main()
