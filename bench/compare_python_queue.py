#!/usr/bin/env python3
"""Runs multiproc's Queue and Pipe benchmarks and the same workloads on Python's
multiprocessing.Queue and Pipe in one run, on the same machine, and prints medians and ratios.

    bench/compare_python_queue.py [--bench build/bench/queue_bench] [--repetitions 5]

Workloads (each producer and each consumer is a process; process start-up is included, as it
is in the C++ benchmark):
  Queue 1->1 small   one producer puts ints, the parent gets them
  Queue 2->2 small   two producers, two consumer processes (stopped by a sentinel each)
  Queue 1->1 1 MiB   the same with 1 MiB items (bytes in Python, std::vector<char> in C++)
  Queue 2->2 1 MiB
  Pipe round trip    send an int to a child that echoes it, receive it back; once as the scheduler
                     places the two processes, once with both pinned to one CPU. On small VMs the
                     first is dominated by the cost of waking a process on another (idle) CPU, the
                     same for every implementation; the second shows the software's own cost.
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

SMALL_ITEMS = 50_000  # Python's rate is measured on fewer items than C++'s 200k: same rate, less time
LARGE_ITEMS = 64
LARGE_BYTES = 1 << 20
ROUND_TRIPS = 20_000


def small(i):
    return i


def large(i):
    return bytes([i % 256]) * LARGE_BYTES


def produce(q, first, step, total, make):
    for i in range(first, total, step):
        q.put(make(i))


def consume(q):
    while q.get() is not None:
        pass


def queue_rate(producers, consumers, total, make):
    """Items per second for one run."""
    q = mp.Queue()
    procs = [mp.Process(target=produce, args=(q, p, producers, total, make)) for p in range(producers)]
    if consumers > 1:
        procs += [mp.Process(target=consume, args=(q,)) for _ in range(consumers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    if consumers == 1:
        for _ in range(total):
            q.get()
    else:
        # Python's Queue: join the producers only after their items left their feeder threads,
        # which a consumer ensures; joining them first is safe here because consumers run.
        for p in procs[:producers]:
            p.join()
        for _ in range(consumers):
            q.put(None)
    for p in procs:
        p.join()
    return total / (time.perf_counter() - t0)


def echo(conn):
    while True:
        x = conn.recv()
        if x < 0:
            return
        conn.send(x)


def pipe_round_trip():
    """Seconds per round trip."""
    here, there = mp.Pipe()
    p = mp.Process(target=echo, args=(there,))
    p.start()
    there.close()
    for i in range(1000):  # warm up
        here.send(i)
        here.recv()
    t0 = time.perf_counter()
    for i in range(ROUND_TRIPS):
        here.send(i)
        here.recv()
    took = time.perf_counter() - t0
    here.send(-1)
    p.join()
    return took / ROUND_TRIPS


def pinned(f):
    """Runs f with this process (and the children it starts) on one CPU."""
    def run():
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(saved)})
        try:
            return f()
        finally:
            os.sched_setaffinity(0, saved)
    return run


def python_figures(reps):
    med = lambda f: statistics.median(f() for _ in range(reps))
    return {
        "q11s": med(lambda: queue_rate(1, 1, SMALL_ITEMS, small)),
        "q22s": med(lambda: queue_rate(2, 2, SMALL_ITEMS, small)),
        "q11l": med(lambda: queue_rate(1, 1, LARGE_ITEMS, large)),
        "q22l": med(lambda: queue_rate(2, 2, LARGE_ITEMS, large)),
        "pipe": med(pipe_round_trip),
        "pipe1": med(pinned(pipe_round_trip)),
    }


def run_benchmarks(binary, reps, extra=(), cpu=None):
    cmd = [binary, f"--benchmark_repetitions={reps}", "--benchmark_report_aggregates_only=true",
           "--benchmark_format=json", *extra]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    data = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, preexec_fn=pin).stdout)
    # run_name carries the options ("BM_X/min_time:0.500/real_time"): key by the name alone.
    return {b["run_name"].split("/")[0]: b for b in data["benchmarks"] if b.get("aggregate_name") == "median"}


def seconds(b):
    return b["real_time"] * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]


def multiproc_figures(binary, reps):
    med = run_benchmarks(binary, reps)
    one_cpu = run_benchmarks(binary, reps, ["--benchmark_filter=BM_PipeRoundTrip"], min(os.sched_getaffinity(0)))
    return {
        "q11s": med["BM_Queue1to1Small"]["items_per_second"],
        "q22s": med["BM_Queue2to2Small"]["items_per_second"],
        "q11l": med["BM_Queue1to1_1MiB"]["items_per_second"],
        "q22l": med["BM_Queue2to2_1MiB"]["items_per_second"],
        "pipe": seconds(med["BM_PipeRoundTrip"]),
        "pipe1": seconds(one_cpu["BM_PipeRoundTrip"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/queue_bench")
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    ours = multiproc_figures(args.bench, args.repetitions)
    theirs = python_figures(args.repetitions)

    def rate(key, unit, div):
        return f"{ours[key] / div:.2f} {unit}", f"{theirs[key] / div:.2f} {unit}", ours[key] / theirs[key]

    rows = [
        ("Queue 1->1, ints", *rate("q11s", "M/s", 1e6)),
        ("Queue 2->2, ints", *rate("q22s", "M/s", 1e6)),
        ("Queue 1->1, 1 MiB items", *rate("q11l", "GiB/s", 1024.0)),
        ("Queue 2->2, 1 MiB items", *rate("q22l", "GiB/s", 1024.0)),
        ("Pipe round trip", f"{ours['pipe'] * 1e6:.1f} us", f"{theirs['pipe'] * 1e6:.1f} us",
         theirs["pipe"] / ours["pipe"]),
        ("Pipe round trip, one CPU", f"{ours['pipe1'] * 1e6:.1f} us", f"{theirs['pipe1'] * 1e6:.1f} us",
         theirs["pipe1"] / ours["pipe1"]),
    ]
    print(f"medians of {args.repetitions} runs; ratio > 1: multiproc is faster")
    python = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    print(f"{'workload':<26} {'multiproc':>14} {python:>14} {'ratio':>8}")
    for name, a, b, r in rows:
        print(f"{name:<26} {a:>14} {b:>14} {r:>7.1f}x")
    print(f"(took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
