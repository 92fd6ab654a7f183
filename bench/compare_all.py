#!/usr/bin/env python3
"""Runs every benchmark behind the performance targets, and the same workloads on Python 3's
multiprocessing, in one run on the same machine; prints one table of medians, ratios and targets,
then a table of machine limits (what the hardware and the kernel cost before any library code).

    bench/compare_all.py [--build-dir build-bench] [--repetitions 5] [--quick]

Builds nothing: configure and build first, for instance
    cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release
    cmake --build build-bench --target pool_bench queue_bench start_bench limits_bench

C++ figures are medians of --repetitions Google Benchmark repetitions (pool_bench, queue_bench's
BM_Queue1to1Small, start_bench's fork entries, limits_bench); Python figures are medians of as many
runs of the same workload. Ratios are taken within this run. Python's workloads:
  apply / map / imap      multiprocessing.Pool(2) (fork): apply(identity, i) one at a time; map
                          over range(10**6), default chunking; imap and map over 20,000 ints with
                          chunksize 1
  256 MiB by value        Pool.apply(len, (bytes of 256 MiB,))
  shared memory           Pool.apply of a task given a multiprocessing.shared_memory.SharedMemory
                          of 16 MiB / 1 GiB (pickled by name, attached by the worker), which writes
                          both ends and returns its size
  Queue 1->1              multiprocessing.Queue, one producer process, ints (compare_python_queue)
  Process start+join      Process(target=noop) with fork; os.fork + os._exit + waitpid for the
                          floor (compare_python_start)
  CPU-bound               40 tasks of ~40 ms (xorshift steps, calibrated here for Python, as the
                          C++ benchmark calibrates itself): serially, on Pool(2) created and torn
                          down inside the timing, and on two bare os.fork children doing 20 each.
                          Speed-up = serial / parallel; the figure is the Pool's speed-up as a
                          percentage of the bare forks'.
The "ratio" column is multiproc's advantage over Python on each figure (> 1: multiproc better).
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
from multiprocessing import resource_tracker, shared_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_python_queue as cq  # noqa: E402  (queue_rate, small, SMALL_ITEMS)
import compare_python_start as cs  # noqa: E402  (process_start_join, raw_fork, per_call)

APPLY_CALLS = 2000
MAP_ITEMS = 1_000_000
CHUNKSIZE1_ITEMS = 20_000
VECTOR_BYTES = 256 << 20
SHM_SIZES = {"16MiB": 16 << 20, "1GiB": 1 << 30}
SHM_CALLS = 300
CPU_TASKS = 40
TASK_SECONDS = 0.040
BINARY_TIMEOUT = 240  # seconds: a hung benchmark fails its figures instead of the whole run

# --------------------------------------------------------------------------------------------
# Python workloads (module level so that the pool can pickle them by reference)


def identity(x):
    return x


def square(x):
    return x * x


def shm_touch(shm):
    shm.buf[0] = 1
    shm.buf[shm.size - 1] = 1
    n = shm.size
    shm.close()
    return n


MASK64 = (1 << 64) - 1


def spin(steps):
    """The C++ benchmark's task: xorshift steps, each depending on the last."""
    x = 88172645463325252
    for _ in range(steps):
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
    return x


def calibrate_spin():
    probe = 100_000  # ~20 ms: long enough for the clock, short enough to run 5 times
    spin(probe)
    spin(probe)  # warm up (Python 3.11 specializes the loop's bytecode after a few runs)
    best = min(timed(lambda: spin(probe)) for _ in range(3))
    return max(1, int(probe * TASK_SECONDS / best))


def timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def median_of(reps, f):
    return statistics.median(f() for _ in range(reps))


def cpu_serial(steps):
    for _ in range(CPU_TASKS):
        spin(steps)


def cpu_pool(steps):
    with mp.get_context("fork").Pool(2) as pool:  # __exit__ terminates, as multiproc's destructor
        pool.map(spin, [steps] * CPU_TASKS, chunksize=1)


def cpu_bare_fork(steps):
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(CPU_TASKS // 2):
                    spin(steps)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)


def python_figures(reps, log):
    out = {}
    # The resource tracker runs before the pool forks, so that workers report to the same one.
    resource_tracker.ensure_running()
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        pool.map(square, range(1000))  # workers started and warm

        def apply_run():
            t0 = time.perf_counter()
            for i in range(APPLY_CALLS):
                pool.apply(identity, (i,))
            return (time.perf_counter() - t0) / APPLY_CALLS

        log("python: Pool.apply")
        out["apply"] = median_of(reps, apply_run)
        log("python: Pool.map 10^6")
        out["map1e6"] = median_of(reps, lambda: MAP_ITEMS / timed(lambda: pool.map(square, range(MAP_ITEMS))))
        log("python: imap / map, chunksize 1")
        out["imap1"] = median_of(
            reps, lambda: CHUNKSIZE1_ITEMS / timed(lambda: sum(pool.imap(square, range(CHUNKSIZE1_ITEMS), 1))))
        out["map1"] = median_of(
            reps, lambda: CHUNKSIZE1_ITEMS / timed(lambda: pool.map(square, range(CHUNKSIZE1_ITEMS), 1)))

        log("python: 256 MiB bytes to apply(len)")
        data = b"x" * VECTOR_BYTES

        def vector_run():
            t0 = time.perf_counter()
            if pool.apply(len, (data,)) != VECTOR_BYTES:
                raise RuntimeError("wrong size")
            return VECTOR_BYTES / (time.perf_counter() - t0)

        vector_run()  # warm up
        out["vector"] = median_of(reps, vector_run)
        del data

        for label, size in SHM_SIZES.items():
            log(f"python: SharedMemory {label} to apply")
            shm = shared_memory.SharedMemory(create=True, size=size)
            try:
                chunk = b"x" * (16 << 20)
                for off in range(0, size, len(chunk)):
                    shm.buf[off:off + len(chunk)] = memoryview(chunk)[:size - off]
                del chunk
                pool.apply(shm_touch, (shm,))  # warm up

                def shm_run():
                    t0 = time.perf_counter()
                    for _ in range(SHM_CALLS):
                        if pool.apply(shm_touch, (shm,)) != size:
                            raise RuntimeError("wrong size")
                    return (time.perf_counter() - t0) / SHM_CALLS

                out[f"shm{label}"] = median_of(reps, shm_run)
            finally:
                shm.close()
                shm.unlink()

    log("python: Queue 1->1 ints")
    out["queue"] = median_of(reps, lambda: cq.queue_rate(1, 1, cq.SMALL_ITEMS, cq.small))
    log("python: Process start+join (fork), os.fork")
    fork_ctx = mp.get_context("fork")
    out["start"] = cs.per_call(lambda: cs.process_start_join(fork_ctx), reps)
    out["rawfork"] = cs.per_call(cs.raw_fork, reps)

    log("python: CPU-bound 40 x 40 ms")
    steps = calibrate_spin()
    out["cpu_steps"] = steps
    out["cpu_serial"] = median_of(reps, lambda: timed(lambda: cpu_serial(steps)))
    out["cpu_task"] = out["cpu_serial"] / CPU_TASKS
    out["cpu_pool"] = median_of(reps, lambda: timed(lambda: cpu_pool(steps)))
    out["cpu_fork"] = median_of(reps, lambda: timed(lambda: cpu_bare_fork(steps)))
    return out


# --------------------------------------------------------------------------------------------
# C++ benchmarks


def run_benchmarks(binary, reps, log, extra=()):
    """Medians by name ("BM_X" or "BM_X/fork"), each a dict of Google Benchmark's JSON fields."""
    cmd = [binary, f"--benchmark_repetitions={reps}", "--benchmark_report_aggregates_only=true",
           "--benchmark_format=json", *extra]
    log(f"C++: {os.path.basename(binary)} {' '.join(extra)}".rstrip())
    try:
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=BINARY_TIMEOUT)
        data = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        err = getattr(e, "stderr", None) or ""
        print(f"warning: {' '.join(cmd)} failed: {e}\n{err[-2000:]}", file=sys.stderr)
        return {}
    out = {}
    for b in data["benchmarks"]:
        # One repetition has no aggregates: then the run itself is the figure.
        if b.get("aggregate_name") != "median" and not (reps == 1 and b.get("run_type") == "iteration"):
            continue
        # run_name carries the options ("BM_X/fork/min_time:0.250/real_time"): key by the rest.
        key = "/".join(p for p in b["run_name"].split("/") if ":" not in p and p != "real_time")
        if b.get("error_occurred"):
            print(f"warning: {key}: {b.get('error_message')}", file=sys.stderr)
            continue
        out[key] = b
    return out


def seconds(b):
    return b["real_time"] * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]


def cpp_figures(build_dir, reps, log):
    bench = os.path.join(build_dir, "bench")
    pool = run_benchmarks(os.path.join(bench, "pool_bench"), reps, log)
    queue = run_benchmarks(os.path.join(bench, "queue_bench"), reps, log, ["--benchmark_filter=^BM_Queue1to1Small/"])
    # Repetitions of the two interleaved in random order: the ratio between them is the figure,
    # and load that comes and goes then weighs on both alike.
    start = run_benchmarks(os.path.join(bench, "start_bench"), reps, log,
                           ["--benchmark_filter=^BM_ProcessStartJoin/fork/|^BM_RawFork/",
                            "--benchmark_enable_random_interleaving=true"])
    limits = run_benchmarks(os.path.join(bench, "limits_bench"), reps, log)

    def get(table, key, field):
        b = table.get(key)
        if b is None:
            return None
        return seconds(b) if field == "time" else b.get(field)

    out = {
        "apply": get(pool, "BM_ApplyRoundTrip", "time"),
        "map1e6": get(pool, "BM_Map1e6Ints", "items_per_second"),
        "imap1": get(pool, "BM_ImapChunksize1", "items_per_second"),
        "map1": get(pool, "BM_MapChunksize1", "items_per_second"),
        "vector": get(pool, "BM_Vector256MiB", "bytes_per_second"),
        "vector_async": get(pool, "BM_Vector256MiBAsync", "bytes_per_second"),
        "shm16MiB": get(pool, "BM_SharedArray16MiB", "time"),
        "shm1GiB": get(pool, "BM_SharedArray1GiB", "time"),
        "cpu_serial": get(pool, "BM_CpuBoundSerial", "time"),
        "cpu_pool": get(pool, "BM_CpuBoundPool", "time"),
        "cpu_fork": get(pool, "BM_CpuBoundBareFork", "time"),
        "queue": get(queue, "BM_Queue1to1Small", "items_per_second"),
        "start": get(start, "BM_ProcessStartJoin/fork", "time"),
        "rawfork": get(start, "BM_RawFork", "time"),
    }
    if out["cpu_serial"] is not None:
        out["cpu_task"] = out["cpu_serial"] / CPU_TASKS
    lim = {
        "fork": get(limits, "BM_ForkExitWait", "time"),
        "futex": get(limits, "BM_FutexPingPong", "time"),
        "futex1": get(limits, "BM_FutexPingPongOneCpu", "time"),
        "spin": get(limits, "BM_SpinPingPong", "time"),
        "memcpy": get(limits, "BM_MemcpyTouched256MiB", "bytes_per_second"),
        "memcpy_fresh": get(limits, "BM_MemcpyFresh256MiB", "bytes_per_second"),
        "memcpy_huge": get(limits, "BM_MemcpyFreshHuge256MiB", "bytes_per_second"),
        "map16MiB": get(limits, "BM_MapSegment16MiB", "time"),
        "map1GiB": get(limits, "BM_MapSegment1GiB", "time"),
        "threads": get(limits, "BM_ThreadPoolRoundTrip", "time"),
        "threads1": get(limits, "BM_ThreadPoolRoundTripOneCpu", "time"),
    }
    return out, lim


# --------------------------------------------------------------------------------------------
# Other load on the machine: the figures mean little if something else ran at the same time.


class LoadMeter:
    """CPU time the whole machine spent busy, minus what this script and its (waited-for)
    descendants used: what other programs took while the benchmarks ran."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.t0, self.busy0, self.steal0, self.ours0 = time.perf_counter(), *self._machine(), self._ours()

    @staticmethod
    def _machine():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        return user + nice + system + irq + softirq, steal

    @staticmethod
    def _ours():
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    def read(self):
        """(other programs' CPU seconds, steal seconds, wall seconds) since construction."""
        busy, steal = self._machine()
        other = (busy - self.busy0) / self.hz - (self._ours() - self.ours0)
        return max(0.0, other), (steal - self.steal0) / self.hz, time.perf_counter() - self.t0


# --------------------------------------------------------------------------------------------
# Report


def fmt_time(s):
    if s is None:
        return "–"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms" if s >= 1e-2 else f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.1f} µs" if s >= 1e-5 else f"{s * 1e6:.2f} µs"
    return f"{s * 1e9:.0f} ns"


def fmt_rate(r):
    if r is None:
        return "–"
    if r >= 1e6:
        return f"{r / 1e6:.2f} M/s"
    return f"{r / 1e3:.1f} k/s"


def fmt_bw(r):
    return "–" if r is None else f"{r / 1e9:.2f} GB/s"


def fmt_ratio(r):
    return "–" if r is None or not math.isfinite(r) else f"{r:.1f}×"


def fmt_ratio2(r):
    return "–" if r is None or not math.isfinite(r) else f"{r:.2f}×"


def div(a, b):
    return None if a is None or b is None or b == 0 else a / b


def speedups(f):
    """(Pool speed-up, bare-fork speed-up, percentage) from serial, pool and fork wall times."""
    pool, fork = div(f.get("cpu_serial"), f.get("cpu_pool")), div(f.get("cpu_serial"), f.get("cpu_fork"))
    pct = None if pool is None or fork is None else 100.0 * pool / fork
    return pool, fork, pct


def yes_no(ok):
    return "–" if ok is None else ("yes" if ok else "no")


def check(*conditions):
    """All true: yes; any false: no; a figure missing: None."""
    if any(c is None for c in conditions):
        return None
    return all(conditions)


def ge(a, b):
    return None if a is None or b is None else a >= b


def le(a, b):
    return None if a is None or b is None else a <= b


def print_table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def report(ours, theirs, lim, reps):
    rows = []
    a, b = ours["apply"], theirs["apply"]
    r = div(b, a)
    missed = set()  # the targets not met, for the notes on machine limits below

    def met(name, ok):
        if not ok:
            missed.add(name)
        return yes_no(ok)

    rows.append(["`apply` round trip, 2 workers, idle task", fmt_time(a), fmt_time(b), fmt_ratio(r),
                 "≤ 5 µs; ≥ 20× Python", met("apply", check(le(a, 5e-6), ge(r, 20)))])
    for key, label in (("imap1", "`imap`, chunksize 1, trivial task"), ("map1", "`map`, chunksize 1, trivial task")):
        a, b = ours[key], theirs[key]
        rows.append([label, fmt_rate(a), fmt_rate(b), fmt_ratio(div(a, b)), "≥ 2 M tasks/s",
                     met("chunksize1", ge(a, 2e6))])
    a, b = ours["map1e6"], theirs["map1e6"]
    r = div(a, b)
    rows.append(["`map` over 10^6 ints, default chunking", fmt_rate(a), fmt_rate(b), fmt_ratio(r), "≥ 20× Python",
                 yes_no(ge(r, 20))])
    a, b = ours["vector"], theirs["vector"]
    rows.append(["256 MiB `std::vector<char>` by value to `apply`, size returned (Python: `bytes`)", fmt_bw(a),
                 fmt_bw(b), fmt_ratio(div(a, b)), "≥ 5 GB/s", met("vector", ge(a, 5e9))])
    a = ours.get("vector_async")
    rows.append(["the same through `apply_async`: copied at submission, then streamed (Python's `apply` "
                 "is `apply_async().get()`)", fmt_bw(a), fmt_bw(b), fmt_ratio(div(a, b)), "reference", "–"])
    a, b = ours["shm16MiB"], theirs["shm16MiB"]
    rows.append(["`SharedArray` of 16 MiB passed to a task (Python: `SharedMemory`)", fmt_time(a), fmt_time(b),
                 fmt_ratio(div(b, a)), "reference for the next row", "–"])
    a, b = ours["shm1GiB"], theirs["shm1GiB"]
    growth = div(a, ours["shm16MiB"])
    rows.append([f"`SharedArray` of 1 GiB passed to a task (× {growth:.2f} the 16 MiB call)" if growth else
                 "`SharedArray` of 1 GiB passed to a task", fmt_time(a), fmt_time(b), fmt_ratio(div(b, a)),
                 "≤ 1 ms; ≤ 2× the 16 MiB call (1/64 of the bytes)", yes_no(check(le(a, 1e-3), le(growth, 2.0)))])
    a, b = ours["queue"], theirs["queue"]
    rows.append(["`Queue<int>` 1 producer → 1 consumer", fmt_rate(a), fmt_rate(b), fmt_ratio(div(a, b)),
                 "≥ 5 M items/s", yes_no(ge(a, 5e6))])
    a, b = ours["start"], theirs["start"]
    over, py_over = div(a, ours["rawfork"]), div(b, theirs["rawfork"])
    rows.append(["`Process` start+join, fork (× bare fork+_exit+waitpid in the same run)",
                 f"{fmt_time(a)} = {fmt_ratio2(over)} {fmt_time(ours['rawfork'])}",
                 f"{fmt_time(b)} = {fmt_ratio2(py_over)} {fmt_time(theirs['rawfork'])}", fmt_ratio(div(b, a)),
                 "≤ 1.3× bare fork", yes_no(le(over, 1.3))])
    pool_s, fork_s, pct = speedups(ours)
    py_pool_s, py_fork_s, py_pct = speedups(theirs)

    def cpu_cell(p, f, c):
        if c is None:
            return "–"
        return f"{c:.1f}%: {p:.2f}× vs {f:.2f}×"

    rows.append(["CPU-bound 40 × 40 ms, Pool(2) incl. start: % of two bare forks' speed-up",
                 cpu_cell(pool_s, fork_s, pct), cpu_cell(py_pool_s, py_fork_s, py_pct), fmt_ratio(div(pct, py_pct)),
                 "≥ 98%", yes_no(ge(pct, 98.0))])

    print(f"\n## Targets (medians of {reps}; ratio > 1: multiproc better than Python "
          f"{sys.version_info[0]}.{sys.version_info[1]})\n")
    print_table(["figure", "multiproc median", "Python median", "ratio", "target", "met?"], rows)

    print("\nCPU-bound wall times (each language calibrates its own ~40 ms task):\n")
    cpu_rows = []
    for name, f in (("multiproc", ours), ("Python", theirs)):
        cpu_rows.append([name, fmt_time(f.get("cpu_task")), fmt_time(f.get("cpu_serial")), fmt_time(f.get("cpu_pool")),
                         fmt_time(f.get("cpu_fork"))])
    print_table(["", "one task (serial / 40)", "serial (40 tasks)", "Pool(2) incl. start", "two bare forks (20 each)"],
                cpu_rows)

    print("\n## Machine limits (C++, limits_bench; medians of the same repetitions)\n")
    print_table(["limit", "median", "what it bounds"], [
        ["fork + _exit + waitpid", fmt_time(lim["fork"]),
         f"`Process` start+join (target ≤ 1.3× → ≤ {fmt_time(1.3 * lim['fork']) if lim['fork'] else '–'})"],
        ["futex round trip between 2 processes, 2 CPUs", fmt_time(lim["futex"]),
         "any round trip where the idle side sleeps (`apply`, a task hand-off)"],
        ["futex round trip, both pinned to one CPU", fmt_time(lim["futex1"]),
         "the same without waking an idle CPU"],
        ["spin ping-pong between 2 processes (pause)", fmt_time(lim["spin"]),
         "a round trip where both sides spin: the hardware floor"],
        ["mmap + write at both ends + munmap, memfd of 16 MiB", fmt_time(lim["map16MiB"]),
         "a `SharedArray` received: the kernel's part"],
        ["the same, 1 GiB", fmt_time(lim["map1GiB"]), "(no copy: the step from 16 MiB is page tables, not data)"],
        ["in-process thread round trip, mutex + condvar, 2 CPUs", fmt_time(lim["threads"]),
         "a thread hand-off inside one process (a caller → supervisor thread step)"],
        ["the same, one CPU", fmt_time(lim["threads1"]), ""],
        ["memcpy 256 MiB, destination already touched", fmt_bw(lim["memcpy"]), "one copy of the data"],
        ["memcpy 256 MiB into fresh memory (mmap, copy, munmap)", fmt_bw(lim["memcpy_fresh"]),
         "one copy into a newly allocated buffer (the receiver's vector)"],
        ["the same with MADV_HUGEPAGE", fmt_bw(lim["memcpy_huge"]), "the same on transparent huge pages"],
    ])

    if lim["spin"] is not None and lim["spin"] > 2e-6:
        print(f"\nWARNING: the spinning ping-pong took {fmt_time(lim['spin'])}: its two processes did not hold two "
              f"CPUs at once, so another load was running; the figures of this run are not reliable.")
    notes = []
    if "apply" in missed and lim["futex"] is not None and lim["futex"] > 5e-6:
        notes.append(f"`apply` ≤ 5 µs: a wake-up of a sleeping process costs a futex round trip of "
                     f"{fmt_time(lim['futex'])} here ({fmt_time(lim['futex1'])} on one CPU), and an in-process "
                     f"condvar round trip {fmt_time(lim['threads'])}; only spinning ({fmt_time(lim['spin'])}) "
                     f"is under 5 µs, so the target needs a side that spins while waiting.")
    if "chunksize1" in missed and lim["futex"] is not None and lim["futex"] > 0.5e-6:
        notes.append(f"2 M tasks/s is 0.5 µs a task: a futex wake-up per task ({fmt_time(lim['futex'])}) "
                     f"would allow {fmt_rate(2 / lim['futex'])} with 2 workers; only spinning or batching "
                     f"several tasks per wake-up reaches it.")
    if "vector" in missed and None not in (lim["memcpy_huge"], lim["memcpy_fresh"]):
        notes.append(f"256 MiB by value ≥ 5 GB/s: the worker's new vector is fresh memory, and one copy into "
                     f"fresh memory runs at {fmt_bw(lim['memcpy_fresh'])} here ({fmt_bw(lim['memcpy_huge'])} on "
                     f"huge pages, which multiproc asks for). `apply` streams the argument from the caller's "
                     f"memory through the ring while the worker copies it into its vector, so that one copy is "
                     f"all the time it takes: it cannot pass {fmt_bw(lim['memcpy_huge'])}.")
    if notes:
        print("\nMissed targets that the machine's limits explain:\n")
        for n in notes:
            print(f"- {n}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build-bench",
                    help="CMake build directory holding bench/pool_bench etc. (default build-bench)")
    ap.add_argument("--repetitions", type=int, default=None, help="repetitions per figure (default 5, 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and shorter Python runs")
    ap.add_argument("-v", "--verbose", action="store_true", help="say what runs, on stderr")
    args = ap.parse_args()
    reps = args.repetitions or (3 if args.quick else 5)
    if args.quick:
        global APPLY_CALLS, SHM_CALLS
        APPLY_CALLS, SHM_CALLS = 1000, 150
        cs.MIN_TIME = 0.2
    build_dir = args.build_dir
    if not os.path.isdir(build_dir):
        alt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), build_dir)
        if os.path.isdir(alt):
            build_dir = alt
        else:
            sys.exit(f"no build directory {args.build_dir}: configure and build first (see --help)")
    mp.set_start_method("fork", force=True)  # Python's own default on Linux up to 3.13

    t0 = time.perf_counter()

    def log(msg):
        if args.verbose:
            print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    ncpu = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]
    meter = LoadMeter()
    ours, lim = cpp_figures(build_dir, reps, log)
    cpp_other = meter.read()
    meter = LoadMeter()
    theirs = python_figures(reps, log)
    py_other = meter.read()
    print(f"# multiproc vs Python {sys.version.split()[0]} multiprocessing: {ncpu} CPUs, "
          f"{reps} repetitions, {time.strftime('%Y-%m-%d')}")
    report(ours, theirs, lim, reps)

    print(f"\nOther programs' CPU use while this ran (load average before: {load_before:.2f}):")
    worst = 0.0
    for name, (other, steal, wall) in (("C++ benchmarks", cpp_other), ("Python workloads", py_other)):
        share = other / (wall * os.cpu_count()) if wall > 0 else 0.0
        worst = max(worst, share)
        print(f"- {name}: {other:.1f} CPU-s in {wall:.0f} s ({100 * share:.0f}% of the machine), "
              f"hypervisor steal {steal:.1f} s")
    if worst > 0.05:
        print("WARNING: something else used the machine during the run; rerun on an idle machine.")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
