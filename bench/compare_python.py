#!/usr/bin/env python3
"""Runs multiproc's Pool benchmarks and the same workloads on Python's multiprocessing.Pool in one
run, on the same machine, and prints medians and ratios.

    bench/compare_python.py [--bench build/bench/pool_bench] [--repetitions 5]
"""
import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time


def identity(x):
    return x


def square(x):
    return x * x


def python_figures(reps):
    """Median per-call seconds for apply, and items/s for map and imap, over `reps` runs."""
    out = {}
    with mp.Pool(2) as pool:
        pool.map(square, range(1000))  # warm up the workers
        apply_runs = []
        for _ in range(reps):
            n = 2000
            t0 = time.perf_counter()
            for i in range(n):
                pool.apply(identity, (i,))
            apply_runs.append((time.perf_counter() - t0) / n)
        out["apply"] = statistics.median(apply_runs)
        map_runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pool.map(square, range(1_000_000))
            map_runs.append(1_000_000 / (time.perf_counter() - t0))
        out["map"] = statistics.median(map_runs)
        imap_runs = []
        for _ in range(reps):
            n = 20_000
            t0 = time.perf_counter()
            sum(pool.imap(square, range(n), chunksize=1))
            imap_runs.append(n / (time.perf_counter() - t0))
        out["imap"] = statistics.median(imap_runs)
    return out


def multiproc_figures(binary, reps):
    # pool_bench has more figures (bench/compare_all.py runs them all): only the three compared here.
    cmd = [binary, f"--benchmark_repetitions={reps}", "--benchmark_report_aggregates_only=true",
           "--benchmark_format=json", "--benchmark_filter=^BM_(ApplyRoundTrip|Map1e6Ints|ImapChunksize1)/"]
    data = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    med = {b["run_name"].split("/")[0]: b for b in data["benchmarks"] if b.get("aggregate_name") == "median"}
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    apply = med["BM_ApplyRoundTrip"]
    return {
        "apply": apply["real_time"] * scale[apply["time_unit"]],
        "map": med["BM_Map1e6Ints"]["items_per_second"],
        "imap": med["BM_ImapChunksize1"]["items_per_second"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/pool_bench")
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    ours = multiproc_figures(args.bench, args.repetitions)
    theirs = python_figures(args.repetitions)
    rows = [
        ("Pool.apply round trip, 2 workers", f"{ours['apply']*1e6:.1f} us", f"{theirs['apply']*1e6:.1f} us",
         theirs["apply"] / ours["apply"]),
        ("Pool.map, 10^6 ints, default chunks", f"{ours['map']/1e6:.2f} M/s", f"{theirs['map']/1e6:.2f} M/s",
         ours["map"] / theirs["map"]),
        ("Pool.imap, chunksize 1", f"{ours['imap']/1e3:.1f} k/s", f"{theirs['imap']/1e3:.1f} k/s",
         ours["imap"] / theirs["imap"]),
    ]
    print(f"medians of {args.repetitions} runs; Python {sys.version.split()[0]}")
    print(f"{'figure':40} {'multiproc':>12} {'Python':>12} {'speed-up':>9}")
    for name, a, b, r in rows:
        print(f"{name:40} {a:>12} {b:>12} {r:>8.1f}x")


if __name__ == "__main__":
    main()
