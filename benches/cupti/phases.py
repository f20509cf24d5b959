#!/usr/bin/env python3
"""Per-step GPU time by phase and kernel, from the `.phases` tables of two profiled runs (see
kernel_times.c; `cim-run bench` marks its phases when CIM_PHASE_MARKERS is set): (long − short) /
extra steps per (phase, kernel). Usage: phases.py SHORT.tsv.phases LONG.tsv.phases EXTRA_STEPS [TOP]"""
import sys
from collections import defaultdict


def load(path):
    rows = {}
    for line in open(path):
        phase, kind, count, ns, nbytes, name = line.rstrip("\n").split("\t", 5)
        rows[(phase, kind, name)] = (int(count), int(ns), int(nbytes))
    return rows


short, long_, steps = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 8
phases = defaultdict(list)
for key, (c, ns, nb) in long_.items():
    c0, ns0, _ = short.get(key, (0, 0, 0))
    phases[key[0]].append(((ns - ns0) / steps / 1e6, (c - c0) / steps, key[1], key[2]))
order = ["tok_encode", "gen_fwd_bwd", "sample_decode", "enh_fwd_bwd", "optim", "after"]
for phase in sorted(phases, key=lambda p: order.index(p) if p in order else len(order)):
    rows = sorted(phases[phase], reverse=True)
    busy = sum(r[0] for r in rows)
    launches = sum(r[1] for r in rows if r[2] == "kernel")
    memsets = sum(r[1] for r in rows if r[2] == "memset")
    print(f"{phase}: GPU busy {busy:.1f} ms/step, {launches:.0f} kernel launches, {memsets:.0f} memsets")
    for ms, count, kind, name in rows[:top]:
        print(f"  {ms:7.2f} ms {count:6.0f}x {kind[:6]:6} {name[:100]}")
