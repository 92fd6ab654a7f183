#!/usr/bin/env python3
"""Runs multiproc's start-cost benchmarks and the same steps on Python's multiprocessing, for each
start method (fork, forkserver, spawn), in one run on the same machine, and prints medians and
ratios.

    bench/compare_python_start.py [--bench build/bench/start_bench] [--repetitions 5]

Workloads, per start method:
  Process start+join     start a process running a function that does nothing, join it
  Pool(N) first result   construct a pool of N workers, apply(square, 3) once, tear the pool down
                         (terminate and join; multiproc's destructor does the same)
and, for reference, the floor under both: fork()+_exit(0)+waitpid and posix_spawn(/bin/true)+
waitpid (os.fork and os.posix_spawn in Python).

The fork server is started before timing, once per program, in both (multiproc::start_fork_server,
multiprocessing.forkserver.ensure_running): the figures are the cost per child, not the server's.
Python's spawned children import this script as their main module; it imports nothing at the top
level but multiprocessing, os and time, so they do no more work than a small program's would.
"""
import multiprocessing as mp
import os
import time

METHODS = ("fork", "forkserver", "spawn")
MIN_TIME = 0.4  # seconds per repetition of one Python figure (at least MIN_ITERS iterations)
MIN_ITERS = 3


def noop():
    pass


def square(x):
    return x * x


def process_start_join(ctx):
    p = ctx.Process(target=noop)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"child exited with {p.exitcode}")


def pool_first_result(ctx, workers):
    pool = ctx.Pool(workers)
    if pool.apply(square, (3,)) != 9:
        raise RuntimeError("wrong result")
    pool.terminate()
    pool.join()


def raw_fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def raw_posix_spawn():
    pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ)
    os.waitpid(pid, 0)


def per_call(f, reps):
    """Median over `reps` runs of the mean seconds per call, each run at least MIN_TIME long."""
    import statistics

    f()  # warm up: page cache, imports, the first start of anything
    runs = []
    for _ in range(reps):
        n = 0
        t0 = time.perf_counter()
        while True:
            f()
            n += 1
            took = time.perf_counter() - t0
            if n >= MIN_ITERS and took >= MIN_TIME:
                break
        runs.append(took / n)
    return statistics.median(runs)


def python_figures(reps):
    import multiprocessing.forkserver

    multiprocessing.forkserver.ensure_running()
    out = {}
    for m in METHODS:
        ctx = mp.get_context(m)
        out[f"BM_ProcessStartJoin/{m}"] = per_call(lambda: process_start_join(ctx), reps)
        for workers in (1, 4):
            out[f"BM_PoolFirstResult/{workers}/{m}"] = per_call(lambda: pool_first_result(ctx, workers), reps)
    out["BM_RawFork"] = per_call(raw_fork, reps)
    out["BM_RawPosixSpawn"] = per_call(raw_posix_spawn, reps)
    return out


def multiproc_figures(binary, reps):
    import json
    import subprocess

    cmd = [binary, f"--benchmark_repetitions={reps}", "--benchmark_report_aggregates_only=true",
           "--benchmark_format=json"]
    data = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    out = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        if b.get("error_occurred"):
            raise RuntimeError(f"{b['run_name']}: {b.get('error_message')}")
        # run_name carries the options ("BM_X/fork/min_time:0.250/real_time"): key by the rest.
        key = "/".join(p for p in b["run_name"].split("/") if ":" not in p and p != "real_time")
        out[key] = b["real_time"] * scale[b["time_unit"]]
    return out


def fmt(seconds):
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def main():
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/start_bench")
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    ours = multiproc_figures(args.bench, args.repetitions)
    theirs = python_figures(args.repetitions)

    rows = []
    for label, key in (("Process start+join", "BM_ProcessStartJoin/{}"),
                       ("Pool(1) to first result", "BM_PoolFirstResult/1/{}"),
                       ("Pool(4) to first result", "BM_PoolFirstResult/4/{}")):
        for m in METHODS:
            rows.append((label, m, key.format(m)))
    rows.append(("raw fork+_exit+waitpid", "-", "BM_RawFork"))
    rows.append(("raw posix_spawn /bin/true", "-", "BM_RawPosixSpawn"))

    print(f"medians of {args.repetitions} runs; ratio = Python / multiproc (> 1: multiproc is faster)")
    python = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
    print(f"{'workload':<26} {'method':<11} {'multiproc':>11} {python:>11} {'ratio':>7}")
    for label, m, key in rows:
        a, b = ours[key], theirs[key]
        print(f"{label:<26} {m:<11} {fmt(a):>11} {fmt(b):>11} {b / a:>6.1f}x")
    print(f"(took {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
