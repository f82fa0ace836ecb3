"""
Watch fan-out of the etcd registry: N proxies' shard sources, M registered
shards, and the time from a put to every source having applied it.

    python -m bench.fanout [--proxies 5] [--shards 1000] [--puts 200]

Starts a single-member etcd on loopback ports (Debian's ``etcd-server``) in
a temporary directory, registers the shards, starts ``--proxies``
``EtcdShardSource`` instances in this process (each with its own client and
watch, as separate proxies would have), then changes one shard record per
put, one put at a time, and times until every source's ``ShardResolver``
(one per source, as in a proxy) has applied it.  etcd's CPU is read from ``/proc/<pid>/stat``.  Prints one
JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.internet import defer, task


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_etcd(directory: str):
    client, peer = _free_port(), _free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    child = subprocess.Popen(
        [binary, "--name", "fanout", "--data-dir", os.path.join(directory, "etcd"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"fanout={peer_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as answer:
                if b"true" in answer.read():
                    return child, url
        except OSError:
            time.sleep(0.1)
    child.kill()
    raise SystemExit("etcd did not start")


def _percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@defer.inlineCallbacks
def _measure(reactor, url: str, etcd_pid: int, proxies: int, shards: int, puts: int):
    from shardtcp.config import read_registered_shard
    from shardtcp.model import Config, ProxyConfig, RegistryConfig, ServiceConfig, SigningConfig
    from shardtcp.registry.etcd import EtcdClient
    from shardtcp.registry.source import EtcdShardSource
    from shardtcp.resolver.service import build_resolver

    config = Config(
        proxy=ProxyConfig(id="fanout"),
        signing=SigningConfig(private_key="unused.pem", kid="k"),
        services=(ServiceConfig(id="api", names=("api.example.test",), shards=()),),
        registry=RegistryConfig(kind="etcd", endpoints=(url,), prefix="/shardtcp/"),
    )
    writer = EtcdClient(reactor, [url])

    def record(n: int, generation: int) -> bytes:
        return json.dumps({"address": f"10.{n // 65536}.{n // 256 % 256}.{n % 256}:443",
                           "capacity": 100 + generation}).encode()

    for n in range(shards):
        yield writer.put(f"/shardtcp/shards/api/s{n:05d}".encode(), record(n, 0))
    sources = [EtcdShardSource(config, EtcdClient(reactor, [url]), read_registered_shard, clock=reactor)
               for _ in range(proxies)]
    resolvers = []
    for source in sources:
        source.startService()
        # each proxy's resolver applies every change before it is counted as seen
        resolver = build_resolver(config, clock=reactor, source=source)
        resolver.startService()
        resolvers.append(resolver)
    while not all(len(s._records) == shards and not s.stale for s in sources):
        yield task.deferLater(reactor, 0.05, lambda: None)

    waiting: dict = {}

    def seen(index: int, source) -> None:
        key, value, started, d, pending = waiting.get("now", (None, None, 0.0, None, None))
        if key is not None and index in pending and resolvers[index].services()[0].shards and any(
            shard.capacity == json.loads(value)["capacity"] and shard.id == key.decode().rsplit("/", 1)[1]
            for shard in resolvers[index].services()[0].shards
        ):
            pending.discard(index)
            if not pending:
                d.callback(time.perf_counter() - started)

    for index, source in enumerate(sources):
        source.subscribe(lambda i=index, s=source: seen(i, s))

    latencies = []
    cpu_before, wall_before = _cpu_seconds(etcd_pid), time.monotonic()
    for p in range(puts):
        n = (p * 7919) % shards
        key, value = f"/shardtcp/shards/api/s{n:05d}".encode(), record(n, p + 1)
        d: defer.Deferred = defer.Deferred()
        waiting["now"] = (key, value, time.perf_counter(), d, set(range(proxies)))
        yield writer.put(key, value)
        latencies.append((yield d))
    cpu, wall = _cpu_seconds(etcd_pid) - cpu_before, time.monotonic() - wall_before
    for source, resolver in zip(sources, resolvers):
        resolver.stopService()
        source.stopService()
    ms = [x * 1000 for x in latencies]
    return {
        "proxies": proxies, "registered_shards": shards, "puts": puts,
        "put_to_all_seen_ms": {"p50": round(_percentile(ms, 0.5), 2), "p90": round(_percentile(ms, 0.9), 2),
                               "max": round(max(ms), 2)},
        "etcd_cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3),
        "etcd_cpu_percent": round(100 * cpu / wall, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout")
    parser.add_argument("--proxies", type=int, default=5)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--puts", type=int, default=200)
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="shardtcp-fanout-")
    child, url = _start_etcd(directory)
    result = {}
    try:
        def run(reactor):
            d = _measure(reactor, url, child.pid, args.proxies, args.shards, args.puts)
            d.addCallback(result.update)
            return d

        from twisted.internet import reactor

        d = run(reactor)
        d.addBoth(lambda outcome: (reactor.stop(), outcome)[1])
        d.addErrback(lambda failure: (result.update(error=failure.getErrorMessage()), None))
        reactor.run()
    finally:
        child.terminate()
        child.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
