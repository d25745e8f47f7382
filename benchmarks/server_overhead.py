"""Engine server overhead: request latency, time to first progress, sustained jobs/s (tiny, CPU).

The server is started the way the QGIS plugin starts it (``LocalEngine.start`` from
``qgis_plugin/engine_client.py``, a subprocess on a free loopback port), then:

* request overhead: median and p95 latency of ``GET /v1/health`` (no token) and
  ``GET /v1/jobs/{id}`` (token) over ``--requests`` requests, once through the plugin's
  stdlib client (a new connection per request, as the plugin polls) and once over one
  keep-alive connection;
* time to first progress: from the start of ``POST /v1/jobs`` until a poll sees
  ``progress > 0`` (the first denoising step done), median over ``--jobs`` jobs (steps 2,
  64 x 64 px, after one warm-up job that loads the model);
* sustained throughput: ``--burst`` such jobs submitted at once, jobs/s until the last is done,
  next to the same jobs run in-process with ``engine.tasks.run_task`` (the server's cost per job
  is the difference); ``--rounds`` alternating rounds, medians reported, so that the load of a
  shared machine hits both alike.

    python benchmarks/server_overhead.py            # prints a Markdown table
    python benchmarks/server_overhead.py --write    # also updates docs/benchmarks.md

``--only reuse`` measures instead what keeping the model loaded is worth: the first and the second
job on one model through the server (``/v1/health``'s ``model_loads`` before and after), and
``--only spread`` the peak RSS of ``generate`` with and without ``spread`` (one process each),
which the server's per-job memory bound rests on. Each writes its own section.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks._report import machine_description, write_section  # noqa: E402
from qgis_plugin.engine_client import EngineClient, LocalEngine  # noqa: E402

JOB = {"task": "generate", "bbox": [583000, 4507000, 583640, 4507640], "crs": "EPSG:32618",
       "date": "2021-06-15", "width": 64, "height": 64, "steps": 2, "seed": 1, "model": "tiny"}


def _ms(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return statistics.median(values) * 1e3, p95 * 1e3


def latency_new_connections(client: EngineClient, job_id: str, n: int) -> dict[str, tuple[float, float]]:
    out = {}
    for label, call in (("GET /v1/health", client.health), ("GET /v1/jobs/{id}", lambda: client.job(job_id))):
        call()  # warm-up
        times = []
        for _ in range(n):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out[label] = _ms(times)
    return out


def latency_keep_alive(url: str, token: str, job_id: str, n: int) -> dict[str, tuple[float, float]]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    out = {}
    try:
        for label, path, headers in (("GET /v1/health", "/v1/health", {}),
                                     ("GET /v1/jobs/{id}", f"/v1/jobs/{job_id}",
                                      {"Authorization": f"Bearer {token}"})):
            times = []
            for i in range(n + 1):
                start = time.perf_counter()
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200, resp.status
                if i:  # the first one is a warm-up
                    times.append(time.perf_counter() - start)
            out[label] = _ms(times)
    finally:
        conn.close()
    return out


def time_to_first_progress(client: EngineClient, jobs: int, poll_s: float) -> tuple[float, float]:
    firsts, totals = [], []
    for i in range(jobs):
        start = time.perf_counter()
        job_id = client.submit(dict(JOB, seed=i))
        first = None
        while True:
            job = client.job(job_id)
            if first is None and (job["progress"] or 0) > 0:
                first = time.perf_counter() - start
            if job["state"] in ("done", "failed", "cancelled"):
                break
            # Not much faster: every poll takes the GIL from the worker thread for ~1 ms.
            time.sleep(poll_s)
        assert job["state"] == "done", job
        firsts.append(first if first is not None else time.perf_counter() - start)
        totals.append(time.perf_counter() - start)
    return statistics.median(firsts) * 1e3, statistics.median(totals) * 1e3


def sustained(client: EngineClient, burst: int, seed0: int = 0) -> float:
    """Submit ``burst`` jobs at once and return jobs/s until the last one is done."""
    start = time.perf_counter()
    ids = [client.submit(dict(JOB, seed=seed0 + i)) for i in range(burst)]
    for job_id in ids:
        assert client.wait(job_id, poll=0.02)["state"] == "done"
    return burst / (time.perf_counter() - start)


class InProcess:
    """The same jobs without the server (one model cache, this process): the baseline."""

    def __init__(self, workdir: Path, device: str) -> None:
        from engine.models.cache import ModelCache

        self.cache = ModelCache()
        self.workdir = workdir
        self.device = device
        self.run(1)  # loads the model

    def run(self, burst: int) -> float:
        from engine.tasks import parse_request, run_task

        start = time.perf_counter()
        for i in range(burst):
            run_task(parse_request(dict(JOB, seed=i, device=self.device)), self.workdir / f"{i}.tif",
                     models=self.cache)
        return burst / (time.perf_counter() - start)


def model_reuse(device: str, jobs: int, size: int, steps: int) -> tuple[list[float], list[float], list]:
    """Seconds from POST to done of ``jobs`` jobs on one fresh server, the server process's CPU
    seconds per job (steadier than wall time on a shared machine), and model_loads after each."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="diffusionsat-bench-") as tmp:
        engine = LocalEngine.start(sys.executable, token_file=str(Path(tmp) / "token"), model="tiny",
                                   extra_args=["--workdir", str(Path(tmp) / "work"), "--log-level", "warning",
                                               "--device", device], timeout=300, cwd=str(REPO))
        try:
            client = engine.client()
            proc = psutil.Process(engine.process.pid)
            seconds, cpu, loads = [], [], []
            for i in range(jobs):
                start, cpu0 = time.perf_counter(), sum(proc.cpu_times()[:2])
                job_id = client.submit(dict(JOB, seed=i, width=size, height=size, steps=steps))
                assert client.wait(job_id, poll=0.2)["state"] == "done"
                seconds.append(time.perf_counter() - start)
                cpu.append(sum(proc.cpu_times()[:2]) - cpu0)
                loads.append(client.health().get("model_loads", "n/a"))
        finally:
            engine.stop()
    return seconds, cpu, loads


_SPREAD_CHILD = """
import resource, sys, tempfile
from engine.tasks import parse_request, run_task
size, spread, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
req = dict(task="generate", bbox=[583000, 4507000, 583000 + 10 * size, 4507000 + 10 * size], crs="EPSG:32618",
           width=size, height=size, steps=steps, seed=1, model="tiny", device="cpu")
if spread > 1:
    req["spread"] = spread
with tempfile.TemporaryDirectory() as tmp:
    run_task(parse_request(req), tmp + "/o.tif")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def spread_peak_rss(size: int, spreads: list[int], steps: int) -> dict[int, int]:
    """Peak RSS (MiB) of one generate job per spread value, each in a fresh process."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = {}
    for spread in spreads:
        done = subprocess.run([sys.executable, "-c", _SPREAD_CHILD, str(size), str(spread), str(steps)],
                              capture_output=True, text=True, env=env, check=True)
        out[spread] = int(done.stdout.strip().splitlines()[-1])
    return out


def main_reuse(args) -> None:
    seconds, cpu, loads = model_reuse(args.device, args.jobs, args.size, args.steps)
    rows = ["| job on one server | POST to done | server CPU time | model_loads after it |", "|---|---|---|---|"]
    rows += [f"| {i + 1} | {s:.2f} s | {c:.2f} s | {n} |" for i, (s, c, n) in enumerate(zip(seconds, cpu, loads))]
    later = statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan")
    later_cpu = statistics.median(cpu[1:]) if len(cpu) > 1 else float("nan")
    table = "\n".join(rows) + "\n"
    summary = (f"First job {seconds[0]:.2f} s wall / {cpu[0]:.2f} s CPU (loads the model), later jobs "
               f"{later:.2f} s / {later_cpu:.2f} s (medians); model_loads after the last: {loads[-1]}.\n")
    print(table + "\n" + summary)
    if args.write:
        cmd = (f"python benchmarks/server_overhead.py --only reuse --jobs {args.jobs} --size {args.size} "
               f"--steps {args.steps} --device {args.device} --write")
        write_section(f"Engine server: model kept loaded between jobs (tiny, {args.device})",
                      f"Command: `{cmd}`\n\nMachine: {machine_description(args.device)}\n\n"
                      "Before the fix (`models or ModelCache()` treated the shared, empty cache as false) every "
                      "job built its model afresh and `model_loads` stayed 0 with `models_loaded: 0`; the tiny "
                      "model's load is cheap, a real checkpoint's is several GB read and moved to the device.\n\n"
                      + table + "\n" + summary)


def main_spread(args) -> None:
    spreads = [1, 4, 8]
    rss = spread_peak_rss(args.size, spreads, args.steps)
    rows = ["| spread samples | peak RSS |", "|---|---|"] + [f"| {k} | {v} MiB |" for k, v in rss.items()]
    table = "\n".join(rows) + "\n"
    print(table)
    if args.write:
        cmd = f"python benchmarks/server_overhead.py --only spread --size {args.size} --steps {args.steps} --write"
        write_section("generate --spread: peak memory per job (tiny, cpu)",
                      f"Command: `{cmd}`\n\nMachine: {machine_description('cpu')}\n\n"
                      f"One `generate` job of {args.size}x{args.size} px, {args.steps} steps, in a fresh process "
                      "each. The samples are denoised and decoded one at a time and the spread map is "
                      "accumulated, so the peak hardly grows with the number of samples (it grew with each one "
                      "when all were one batch: 6.7 GB for 1024 px x 16 with a real model).\n\n" + table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="requests per latency measurement")
    p.add_argument("--jobs", type=int, default=10, help="jobs for the time to first progress")
    p.add_argument("--burst", type=int, default=20, help="jobs submitted at once for jobs/s")
    p.add_argument("--rounds", type=int, default=3,
                   help="bursts through the server, each followed by the same jobs in-process")
    p.add_argument("--poll-ms", type=float, default=10.0, help="poll interval for the first-progress timing")
    p.add_argument("--device", default="cpu", help="the engine's --device (cpu, cuda)")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--only", choices=["reuse", "spread"], help="measure only model reuse or spread memory")
    p.add_argument("--size", type=int, default=64, help="output side in px for --only reuse/spread")
    p.add_argument("--steps", type=int, default=2, help="steps for --only reuse/spread")
    args = p.parse_args()
    if args.only == "reuse":
        return main_reuse(args)
    if args.only == "spread":
        return main_spread(args)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="diffusionsat-bench-") as tmp:
        tmp_path = Path(tmp)
        started = time.perf_counter()
        engine = LocalEngine.start(sys.executable, token_file=str(tmp_path / "token"), model="tiny",
                                   extra_args=["--workdir", str(tmp_path / "work"), "--log-level", "warning",
                                               "--device", args.device],
                                   timeout=300, cwd=str(REPO))  # this checkout's engine, not an installed one
        startup_s = time.perf_counter() - started
        try:
            client = engine.client()
            warm = client.submit(JOB)  # loads the model once
            client.wait(warm, poll=0.02)
            fresh = latency_new_connections(client, warm, args.requests)
            alive = latency_keep_alive(engine.url, engine.token, warm, args.requests)
            first_ms, total_ms = time_to_first_progress(client, args.jobs, args.poll_ms / 1e3)
            # Alternating server and in-process rounds, so that drift in the machine's load hits
            # both alike; the medians are reported.
            direct = InProcess(tmp_path, args.device)
            server_rates, direct_rates = [], []
            for r in range(args.rounds):
                server_rates.append(sustained(client, args.burst, seed0=r * args.burst))
                direct_rates.append(direct.run(args.burst))
        finally:
            engine.stop()
        server_rate, direct_rate = statistics.median(server_rates), statistics.median(direct_rates)

    rows = [
        "| measurement | median | p95 |",
        "|---|---|---|",
    ]
    for label in fresh:
        rows.append(f"| {label}, plugin client (new connection each) | {fresh[label][0]:.2f} ms | {fresh[label][1]:.2f} ms |")
        rows.append(f"| {label}, one keep-alive connection | {alive[label][0]:.2f} ms | {alive[label][1]:.2f} ms |")
    rows.append(f"| POST /v1/jobs to first progress > 0 (steps 2, 64x64, {args.jobs} jobs, "
                f"polled every {args.poll_ms:g} ms) | {first_ms:.0f} ms | |")
    rows.append(f"| POST /v1/jobs to done (same jobs) | {total_ms:.0f} ms | |")
    rows.append(f"| server start to ready line (LocalEngine.start) | {startup_s:.1f} s | |")
    table = "\n".join(rows) + "\n"
    per_job_ms = (1 / server_rate - 1 / direct_rate) * 1e3
    throughput = (
        "| jobs at once | through the server | in-process run_task | server cost per job |\n"
        "|---|---|---|---|\n"
        f"| {args.burst} (steps 2, 64x64; median of {args.rounds} rounds) | {server_rate:.2f} jobs/s "
        f"| {direct_rate:.2f} jobs/s | {per_job_ms:.0f} ms |\n"
    )
    print(table)
    print(throughput)
    if args.write:
        body = (
            f"Command: `python benchmarks/server_overhead.py --requests {args.requests} --jobs {args.jobs} "
            f"--burst {args.burst} --rounds {args.rounds} --poll-ms {args.poll_ms:g} --device {args.device} --write`\n\n"
            f"Machine: {machine_description(args.device)}\n\n"
            "The tiny model, so the model's own time is small and the server's shows. The CPU timings\n"
            "move with the machine's load (2 shared cores): compare rows of one run, not runs.\n\n"
            + table + "\n" + throughput
        )
        write_section(f"Engine server overhead (tiny, {args.device})", body)


if __name__ == "__main__":
    main()
