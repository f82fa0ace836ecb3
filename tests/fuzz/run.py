"""
Run one fuzz target for longer than ``trial tests`` does.

    python -m tests.fuzz.run TARGET --seconds 3600
    python -m tests.fuzz.run all --seconds 600
    python -m tests.fuzz.run --write-seeds

With atheris installed (``pip install atheris``), the run is coverage
guided (libFuzzer): it starts from ``tests/fuzz/corpus/TARGET/``, keeps
the new inputs it finds in a work folder (``--work``, a temporary one by
default), bounds each input's time (``--timeout``) and the process's
memory (``--rss-limit-mb``), and writes any crashing input as
``crash-<sha1>`` in the current folder.  Without atheris (or with
``--engine hypothesis``) the Hypothesis strategies of ``trial tests`` run
for the time given.  Exit status 0 means nothing was found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

TARGET_NAMES = ("clienthello", "detect", "proxy", "verifier", "feeds", "config", "agent")


def _atheris_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("atheris") is not None


def run_atheris(target: str, seconds: int, work: str, timeout: int, rss_limit_mb: int, max_len: int) -> int:
    import atheris

    # Only modules imported inside this block are instrumented, so nothing
    # of shardtcp may be imported before it.
    with atheris.instrument_imports(include=["shardtcp"]):
        from tests.fuzz import seeds, targets
    # libFuzzer bounds each input's time with SIGALRM itself (-timeout).
    targets.use_alarm(False)
    corpus = os.path.join(seeds.CORPUS, target)
    os.makedirs(work, exist_ok=True)
    argv = [
        sys.argv[0],
        work,
        corpus,
        f"-max_total_time={seconds}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-max_len={max_len}",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, targets.TARGETS[target])
    atheris.Fuzz()
    return 0  # atheris.Fuzz exits the process itself


def run_hypothesis(target: str, seconds: float) -> int:
    from tests.fuzz import test_fuzz

    check, strategy = test_fuzz.target_strategy(target)
    batches = test_fuzz.fuzz_for_budget(strategy, check, seconds=seconds)
    print(f"{target}: {batches} batches in {seconds:g} s, nothing found")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", choices=TARGET_NAMES + ("all",))
    parser.add_argument("--seconds", type=int, default=60, help="how long to run each target (default 60)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--work", help="folder for the inputs a run finds (default: a temporary folder)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (atheris)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048, help="memory bound of the run (atheris)")
    parser.add_argument("--max-len", type=int, default=65536, help="longest input tried (atheris)")
    parser.add_argument("--write-seeds", action="store_true", help="write tests/fuzz/corpus/ from seeds.py")
    options = parser.parse_args(argv)

    if options.write_seeds:
        from tests.fuzz import seeds

        for path in seeds.write_seeds():
            print(path)
        return 0
    if options.target is None:
        parser.error("name a target, or all")
    engine = options.engine
    if engine == "auto":
        engine = "atheris" if _atheris_available() else "hypothesis"
    names = TARGET_NAMES if options.target == "all" else (options.target,)

    if engine == "hypothesis":
        return max(run_hypothesis(name, options.seconds) for name in names)
    if len(names) > 1:
        # libFuzzer owns the process it runs in: one child per target.
        status = 0
        for name in names:
            argv = [sys.executable, "-m", "tests.fuzz.run", name, "--engine", "atheris",
                    "--seconds", str(options.seconds), "--timeout", str(options.timeout),
                    "--rss-limit-mb", str(options.rss_limit_mb), "--max-len", str(options.max_len)]
            if options.work:
                argv += ["--work", os.path.join(options.work, name)]
            status = max(status, subprocess.call(argv))
        return status
    work = options.work or tempfile.mkdtemp(prefix=f"shardtcp-fuzz-{names[0]}-")
    try:
        return run_atheris(names[0], options.seconds, work, options.timeout, options.rss_limit_mb, options.max_len)
    finally:
        if not options.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
