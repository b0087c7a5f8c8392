#!/usr/bin/env python3
"""Markdown summary of one bench/compare.sh run.

usage: summarize.py [results.jsonl]   (default: newest bench/results/*.jsonl)

Values are median [min–max] over the repetitions. Target ratios compare medians;
the per-repetition ratios (lienthong and peer from the same repetition) are shown
next to them so that a verdict carried by one lucky repetition is visible.
"""
import glob
import json
import os
import re
import statistics
import sys
from collections import defaultdict

RABBIT = "rabbitmq-3.10.8-quorum"
NATS = "nats-2.15.1-sync-always"
LABEL = {RABBIT: "RabbitMQ 3.10.8 quorum", NATS: "NATS 2.15.1 sync-always", "lienthong": "lienthong"}


def newest():
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(here, "results", "*.jsonl")))
    if not files:
        sys.exit("no results file given and none in bench/results/")
    return files[-1]


path = sys.argv[1] if len(sys.argv) > 1 else newest()
rows = [json.loads(line) for line in open(path) if line.strip()]
meta = next((r for r in rows if r.get("kind") == "meta"), {})
end = next((r for r in rows if r.get("kind") == "end"), {})
errors = [r for r in rows if "error" in r]
good = [r for r in rows if "error" not in r and "kind" not in r]


def num(x, nd=0):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def mrange(vals, nd=0):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    m = statistics.median(vals)
    return f"{num(m, nd)} [{num(min(vals), nd)}–{num(max(vals), nd)}]" if len(vals) > 1 else num(m, nd)


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


# ---- collect: ours[scenario][rep] = dict, peers[(cfg, size, inflight)][rep] = row, disk rows
ours = defaultdict(dict)
fake = False
for r in good:
    if r.get("side") == "lienthong":
        fake = fake or bool(r.get("fake"))
        for s in r.get("scenarios", []):
            # Scenario 1 also runs with the inbox folder export: kept apart as "1x".
            key = "1x" if s.get("scenario") == 1 and s.get("inbox_export") else s.get("scenario")
            ours[key][r["rep"]] = s
peers = defaultdict(dict)
for r in good:
    if r.get("side") in ("rabbitmq", "nats"):
        peers[(r["cfg"], r["size"], r["inflight"])][r["rep"]] = r
fsync = defaultdict(dict)
seq = {}
for r in good:
    if r.get("side") == "disk" and r.get("test") == "fsync-py":
        fsync[r["mode"]][r["rep"]] = r
    elif r.get("side") == "disk" and r.get("test") == "seq-write":
        seq[r["rep"]] = r
reps = sorted({r["rep"] for r in rows if "rep" in r})


def size_of(s):
    m = re.search(r"(\d+)\s*KiB", s.get("name", ""))
    return int(m.group(1)) * 1024 if m else None


# A uniform view of one measurement: rate, MiB/s, p50, p99, count.
def ours_view(n):
    out = {}
    for rep, s in ours.get(n, {}).items():
        size = size_of(s)
        rate = s.get("docs_per_sec")
        out[rep] = {"rate": rate, "mib": rate * size / 2**20 if rate is not None and size else None,
                    "p50": s.get("p50_ms"), "p99": s.get("p99_ms"), "n": s.get("documents"),
                    "reported_mb": s.get("mb_per_sec"),
                    "cpu": (s.get("cpu_us_per_doc") or {})}
    return out


def peer_view(cfg, size, inflight):
    return {rep: {"rate": r["msgs_per_s"], "mib": r["MiB_per_s"], "p50": r.get("e2e_p50_ms"),
                  "p99": r.get("e2e_p99_ms"), "n": r.get("count"), "reported_mb": None}
            for rep, r in peers.get((cfg, size, inflight), {}).items()}


S1, S1X, S2, S3 = ours_view(1), ours_view("1x"), ours_view(2), ours_view(3)
R1, N1 = peer_view(RABBIT, 1024, 256), peer_view(NATS, 1024, 256)
N2 = peer_view(NATS, 1024, 1)
R3, N3 = peer_view(RABBIT, 262144, 256), peer_view(NATS, 262144, 256)

# ---- header
print(f"# lienthong vs peers: {os.path.basename(path)}\n")
if fake:
    print("> **WARNING: the lienthong numbers in this file come from the LIENTHONG_BENCH_FAKE test hook "
          "(a fixture), not from a measurement. Only the peer and disk figures are real.**\n")
if meta:
    print(f"- machine: {meta.get('host')} · {meta.get('cpus')} CPUs · {meta.get('mem')} · kernel {meta.get('kernel')}")
    print(f"- lienthong commit {str(meta.get('repo_commit'))[:12]}{' (dirty tree)' if meta.get('repo_dirty') else ''}; "
          f"peers: {meta.get('nats_version')}, rabbitmq-server {meta.get('rabbitmq_version')}")
    print(f"- {meta.get('reps')} repetitions; per run: {meta.get('count')} × 1 KiB / 256 in flight, "
          f"{meta.get('large_count')} × 256 KiB / 256 (peers), {meta.get('lat_count')} × 1 KiB / 1 (NATS); "
          f"fsync probe {meta.get('fsync_secs')} s per mode; sequential write {meta.get('seq_mib')} MiB")
cond = next((r.get("conditions") for r in good if r.get("side") == "lienthong" and r.get("conditions")), None)
if cond:
    print(f"- lienthong conditions (rep 1 as reported): `{json.dumps(cond, ensure_ascii=False)}`")
if end:
    print(f"- total run time {end['total_secs'] // 60} min {end['total_secs'] % 60} s")
print("- peers are measured end to end with loadgen `*-e2e` (publisher confirms + consumer acks every message); "
      "rates are per second, latencies are publish call → consumer receipt")

# ---- scenario table
print("\n## Scenarios: median [min–max] over repetitions\n")
print("| scenario | system | docs or msgs/s | MiB/s | p50 ms | p99 ms | n/run | runs |")
print("|---|---|---|---|---|---|---|---|")


def line(scn, who, v, note=""):
    if not v:
        print(f"| {scn} | {who} | no data | | | | | 0 |")
        return
    vs = list(v.values())
    ns = sorted({x["n"] for x in vs if x["n"] is not None})
    print(f"| {scn} | {who}{note} | {mrange([x['rate'] for x in vs])} | {mrange([x['mib'] for x in vs], 1)} | "
          f"{mrange([x['p50'] for x in vs], 2)} | {mrange([x['p99'] for x in vs], 2)} | "
          f"{'/'.join(str(n) for n in ns) or 'n/a'} | {len(vs)} |")


line("1: 1 KiB, 256 in flight", "lienthong (gateway reads the API)", S1)
line("1: 1 KiB, 256 in flight", "lienthong (with inbox folder export)", S1X)
line("1: 1 KiB, 256 in flight", LABEL[RABBIT], R1)
line("1: 1 KiB, 256 in flight", LABEL[NATS], N1)
line("2: 1 KiB, latency", "lienthong", S2)
line("2: 1 KiB, latency", LABEL[NATS], N2, " (1 in flight)")
line("3: 256 KiB, 256 in flight", "lienthong", S3)
line("3: 256 KiB, 256 in flight", LABEL[RABBIT], R3)
line("3: 256 KiB, 256 in flight", LABEL[NATS], N3)
rep_mb = [x["reported_mb"] for v in (S1, S2, S3) for x in v.values() if x["reported_mb"] is not None]
if rep_mb:
    print("\nlienthong MiB/s is docs/s × nominal size; its own `mb_per_sec` medians: "
          + ", ".join(f"scenario {n} {num(med([x['reported_mb'] for x in v.values()]), 1)}"
                      for n, v in ((1, S1), (2, S2), (3, S3)) if v))

# ---- targets
print("\n## Targets (ratio of the medians; per-rep ratios pair lienthong and peer runs of the same repetition)\n")
print("| target | lienthong | peer | ratio | per-rep ratios | goal | result |")
print("|---|---|---|---|---|---|---|")


def target(name, ours_v, peer_v, key, goal, higher_is_better, nd=0, unit="", aim=None):
    a = med([x[key] for x in ours_v.values()])
    b = med([x[key] for x in peer_v.values()])
    if a is None or b is None or b == 0:
        print(f"| {name} | {num(a, nd)}{unit} | {num(b, nd)}{unit} | n/a | | {goal_txt(goal, higher_is_better)} | NO DATA |")
        return
    ratio = a / b
    paired = [ours_v[r][key] / peer_v[r][key] for r in sorted(ours_v) if r in peer_v
              and ours_v[r][key] is not None and peer_v[r][key]]
    ok = ratio >= goal if higher_is_better else ratio <= goal
    every = all((p >= goal) if higher_is_better else (p <= goal) for p in paired)
    verdict = "PASS" if ok else "MISS"
    if ok and paired and not every:
        verdict += " (not in every rep)"
    if ok and aim is not None:
        verdict += " (aim met)" if (ratio >= aim if higher_is_better else ratio <= aim) else " (aim missed)"
    pr = ", ".join(f"{p:.2f}" for p in paired)
    goal_text = goal_txt(goal, higher_is_better) + (f" (aim {goal_txt(aim, higher_is_better)})" if aim is not None else "")
    print(f"| {name} | {num(a, nd)}{unit} | {num(b, nd)}{unit} | {ratio:.2f} | {pr} | "
          f"{goal_text} | **{verdict}** |")


def goal_txt(goal, higher):
    return f"≥ {goal:g}" if higher else f"≤ {goal:g}"


# Issue 11's targets: "must" is the goal, "aim" the stretch.
target("S1 docs/s vs RabbitMQ quorum", S1, R1, "rate", 1, True, 0, "/s", aim=2)
target("S1 docs/s vs NATS sync-always", S1, N1, "rate", 3, True, 0, "/s", aim=4)
target("S1 with inbox export, docs/s vs RabbitMQ quorum (reported, no goal)", S1X, R1, "rate", 1, True, 0, "/s")
target("S2 p50 vs NATS sync-always 1 KiB/1 e2e p50", S2, N2, "p50", 2, False, 2, " ms", aim=1)
target("S2 p99 vs NATS sync-always 1 KiB/1 e2e p99 (aim only)", S2, N2, "p99", 1, False, 2, " ms")
target("S3 MB/s vs RabbitMQ quorum", S3, R3, "rate", 1, True, 0, "/s", aim=1.5)

# ---- CPU per document
cpu_rows = [(n, v) for n, v in (("1", S1), ("1 with export", S1X), ("2", S2), ("3", S3)) if v]
if any(x["cpu"] for _, v in cpu_rows for x in v.values()):
    print("\n## CPU per document (µs of user + system time, median over repetitions)\n")
    print("| scenario | broker | sender agent | recipient agent | sum | driver |")
    print("|---|---|---|---|---|---|")
    for n, v in cpu_rows:
        col = lambda k: num(med([x["cpu"].get(k) for x in v.values()]), 0)
        print(f"| {n} | {col('broker')} | {col('sender')} | {col('recipient')} | {col('sum')} | {col('driver')} |")
print("\nS3 compares documents/s with messages/s: both sides move 256 KiB payloads, so this is the MB/s ratio "
      "whatever MB unit each side reports. Latency ratios are ours/theirs (goal: ours ≤ theirs).")

# ---- disk
print("\n## Disk in the same run\n")
print("| probe | median [min–max] | p50 ms | p99 ms | runs |")
print("|---|---|---|---|---|")
for mode in ("append", "overwrite"):
    v = list(fsync.get(mode, {}).values())
    if v:
        print(f"| 1 KiB write + fdatasync ({mode}), ops/s | {mrange([x['ops_per_s'] for x in v])} | "
              f"{mrange([x['p50_ms'] for x in v], 3)} | {mrange([x['p99_ms'] for x in v], 3)} | {len(v)} |")
v = list(seq.values())
if v:
    print(f"| sequential write {v[0]['size_mib']} MiB + fdatasync, MB/s | {mrange([x['MB_per_s'] for x in v])} | | | {len(v)} |")

# ---- per repetition
order = defaultdict(list)
for r in rows:
    side = r.get("side")
    if "rep" in r and side and side != "disk" and side not in order[r["rep"]]:
        order[r["rep"]].append(side)
print("\n## Per repetition (run order and swings)\n")
print("| rep | order | fsync append ops/s | fsync overwrite ops/s | seq write MB/s | lienthong S1 docs/s | "
      "RabbitMQ quorum 1 KiB/256 msgs/s | NATS sync-always 1 KiB/256 msgs/s |")
print("|---|---|---|---|---|---|---|---|")


def g(d, rep, key):
    x = d.get(rep)
    return num(x.get(key)) if x else "n/a"


for rep in reps:
    print(f"| {rep} | {' → '.join(order.get(rep, []))} | {g(fsync['append'], rep, 'ops_per_s')} | "
          f"{g(fsync['overwrite'], rep, 'ops_per_s')} | {g(seq, rep, 'MB_per_s')} | {g(S1, rep, 'rate')} | "
          f"{g(R1, rep, 'rate')} | {g(N1, rep, 'rate')} |")

print("\nFor reference, peer-bench's own recorded medians on this machine type (3 reps): "
      "RabbitMQ quorum ≈ 6,400 msg/s and NATS sync-always ≈ 2,100 msg/s at 1 KiB / 256 in flight.")
if errors:
    print("\n## Failed runs\n")
    for e in errors:
        what = f"size={e['size']} inflight={e.get('inflight')}" if e.get("size") else ""
        print(f"- rep {e.get('rep')}: {e.get('cfg')} {e.get('test')} {what}: {e.get('error')}")
