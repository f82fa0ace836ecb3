"""
shardtcp's performance bench: the proxy side by side with a direct
connection, HAProxy and Twisted's ``portforward``, in one run, on loopback.

    python bench/run.py [--quick] [--json out.json] [--keep] [--only RUN ...]

The runs (``bench/runs/``): ``tls`` (TLS bulk, short TLS connections, memory
held), ``connrate`` (wrk, ``Connection: close``), ``bulk_plain`` (plain TCP,
HAProxy with and without splice), ``resolver`` (3 to 10,000 shards),
``shardkey`` (choosing by shard key at 100 and 10,000 shards), ``micro`` (per-connection pieces) and ``workers`` (1 and 2 worker processes).
A run that cannot measure what it promises stops the bench with its reason
and exit status 1; every process started is stopped on the way out, also
on Ctrl-C and SIGTERM.  How to read the output: ``bench/README.rst``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import goals  # noqa: E402
from bench.lab import REPO_ROOT, BenchError, Lab, optional_version, say  # noqa: E402
from bench.runs import bulk_plain, connrate, memory, micro, resolver, shardkey, tls, workers  # noqa: E402

RUNS = {
    "tls": tls,
    "connrate": connrate,
    "bulk_plain": bulk_plain,
    "resolver": resolver,
    "shardkey": shardkey,
    "micro": micro,
    "workers": workers,
    "memory": memory,
}


def settings_for(options: argparse.Namespace) -> dict:
    quick = options.quick
    return {
        "quick": quick,
        "rounds": options.rounds or (1 if quick else 3),
        "tls_bulk_mib": 64 if quick else 256,
        "bulk_mib": 256 if quick else 1024,
        "connections": 300 if quick else 2000,
        "concurrency": 8,
        "time_limit": 8.0 if quick else 20.0,
        "hold": 500 if quick else 1000,
        "wrk_seconds": 4 if quick else 10,
        "wrk_connections": 8,
    }


def meta(quick: bool) -> dict:
    from importlib.metadata import version

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_model()}, Linux {platform.release()}",
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "twisted": version("twisted"),
        "haproxy": optional_version(["haproxy", "-v"]) or "haproxy: not installed",
        "wrk": optional_version(["wrk", "--version"]) or "wrk: not installed",
        "commit": _git_commit(),
        "quick": quick,
        # Other work on the machine inflates every figure, CPU ones included.
        "load_before": "%.2f %.2f %.2f" % os.getloadavg(),
    }


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "shardtcp")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py",
                                     description="Measure shardtcp against a direct connection, HAProxy and "
                                                 "Twisted's portforward on loopback.")
    parser.add_argument("--quick", action="store_true", help="smaller run, under 3 minutes on 2 cores")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (configurations, logs)")
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="run only these")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="interleaved rounds of the bulk and connection-rate runs, each target's median "
                             "kept (default 3, 1 with --quick)")
    options = parser.parse_args(argv)
    if options.rounds is not None and options.rounds < 1:
        parser.error("--rounds must be at least 1")
    # A SIGTERM unwinds like Ctrl-C, so the processes started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = settings_for(options)
    started = time.monotonic()
    results: dict = {"meta": meta(options.quick), "settings": settings}
    workdir = tempfile.mkdtemp(prefix="shardtcp-bench-")
    failed = None
    try:
        for name, module in RUNS.items():
            if options.only and name not in options.only:
                continue
            say(f"run {name}")
            os.mkdir(os.path.join(workdir, name))
            lab = Lab(os.path.join(workdir, name))
            try:
                lab.prepare()
                results[name] = module.run(lab, settings)
            except BenchError as e:
                failed = f"{name}: {e}"
                break
            except Exception as e:
                # Not a measurement that went wrong but the bench itself (or
                # an API it uses that moved): say where, and fail.
                traceback.print_exc()
                failed = f"{name}: {type(e).__name__}: {e}"
                break
            finally:
                lab.close()
    finally:
        if options.keep or failed:
            say(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["load_after"] = "%.2f %.2f %.2f" % os.getloadavg()
    m = results["meta"]
    print(f"shardtcp bench, {m['date']}, commit {m['commit']}{' (--quick)' if m['quick'] else ''}, "
          f"{m['seconds']} s\n{m['machine']}\nPython {m['python']}, {m['openssl']}, Twisted {m['twisted']}\n"
          f"{m['haproxy']}\n{m['wrk']}\n"
          f"load average (1, 5, 15 min) before {m['load_before']}, after {m['load_after']}\n")
    for name, module in RUNS.items():
        if name in results:
            print(module.report(results[name]) + "\n")
    print(goals.report(results) + "\n")
    if options.json:
        with open(options.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
            f.write("\n")
    if failed:
        print(f"bench FAILED in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
