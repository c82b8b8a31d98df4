#!/usr/bin/env python3
"""Churn sweeps whose results.json was not kept, rebuilt from their tables in
docs/benchmarks.md for `ste-bench model`: one step per table row, CPU seconds
= the table's "CPU s per 100 Deployments" x sent / 100 (rounded to 0.1 per
100 in the table), no latency samples (the model then takes the CPU window
as the sending time + the row's p99.9 create->bound).

    python3 docs/results/transcribed/transcribe.py   # from the repository root
"""
import json
import re

TABLES = {
    # file: the line the table follows in docs/benchmarks.md (its rows are the first after it)
    "churn-qps200-2026-12-02.json": "**Rerun at 10, 20 and 30/s**",
    "churn-qps200-2026-11-22.json": "`ste-bench churn --arms stock,tuned,ste --sweep 10,20,30,40",
    "churn-default-qps-2026-11-22.json": "With Kubernetes' **default client limits**",
}
ARMS = {"Stock", "Stock-qps", "Tuned", "Override", "Ste"}


def rows_after(lines, heading):
    start = next(i for i, l in enumerate(lines) if l.startswith(heading))
    rows, seen = [], False
    for line in lines[start:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in ARMS:
            rows.append(cells)
            seen = True
        elif seen and not line.startswith("|"):
            break
    return rows


def step(cells):
    arm = cells[0]
    members = 1
    if cells[1].isdigit():  # the tables with an "etcd members" column
        members = int(cells[1])
        cells = [arm] + cells[2:]
    limits, offered, achieved, sustained, bound = cells[1:6]
    latency, cpu = cells[6], cells[8]
    sent = int(bound.split("/")[1])
    qps = re.search(r"QPS (\d+)", limits)
    per100 = [(m.group(1), float(m.group(2))) for m in re.finditer(r"([\w-]+) ([\d.]+)", cpu)]
    return {
        "arm": arm,
        "client_qps": int(qps.group(1)) if qps else None,
        "etcd_members": members,
        "offered_per_s": float(offered),
        "sent": sent,
        "bound": int(bound.split("/")[0]),
        "achieved_per_s": float(achieved),
        "sustained": sustained == "yes",
        "bound_p999_ms": float(latency.split("/")[2]),
        "cpu_seconds": [[name, round(v * sent / 100, 3)] for name, v in per100],
    }


def main():
    lines = open("docs/benchmarks.md").read().splitlines()
    for name, heading in TABLES.items():
        steps = [step(r) for r in rows_after(lines, heading)]
        with open(f"docs/results/transcribed/{name}", "w") as out:
            json.dump(steps, out, indent=1)
            out.write("\n")
        print(name, len(steps), "steps")


main()
