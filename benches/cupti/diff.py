#!/usr/bin/env python3
"""Per-step GPU time by kernel: (long run − short run) / (extra steps), so set-up, warm-up and the
precision check cancel. Usage: diff.py SHORT.tsv LONG.tsv EXTRA_STEPS [TOP]"""
import sys


def load(path):
    rows = {}
    for line in open(path):
        kind, count, ns, nbytes, name = line.rstrip("\n").split("\t", 4)
        rows[(kind, name)] = (int(count), int(ns), int(nbytes))
    return rows


short, long_, steps = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
top = int(sys.argv[4]) if len(sys.argv) > 4 else 40
per = []
for key, (c, ns, nb) in long_.items():
    c0, ns0, nb0 = short.get(key, (0, 0, 0))
    per.append(((ns - ns0) / steps / 1e6, (c - c0) / steps, (nb - nb0) / steps, key))
per.sort(reverse=True)
total = sum(p[0] for p in per)
launches = sum(p[1] for p in per if p[3][0] == "kernel")
print(f"GPU busy {total:.1f} ms/step, {launches:.0f} kernel launches/step")
for ms, count, nbytes, (kind, name) in per[:top]:
    extra = f" {nbytes / count / 1e6:.1f}MB" if kind != "kernel" and count else ""
    print(f"{ms:8.2f} ms {100 * ms / total:5.1f}% {count:7.0f}x {kind[:6]:6} {name[:110]}{extra}")
