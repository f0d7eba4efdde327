"""Load test of the service: a real uvicorn process on 127.0.0.1 (default model), extrapolation requests of
1000 context / 245 target points, 8 samples, 16 Euler steps, at concurrency 1, 4 and 16.

Prints per level: requests answered, throughput (successful requests/s), p50/p99 latency (from the first
try), the fair share (clients / throughput: what each of them waits when served in turn, Little's law) and
p99 over it (goal <= 1.5), responses other than 200 by status (503 = deliberate overload refusals, retried
after Retry-After with the X-Retry-Ticket); first served latency over the engine's own latency for one
request (median of a few sequential ones; goal <= 1.1). Then, with --burst N, the lockout scenario of the
service review (D1) with the README's small example (service/examples/extrapolate.json: 50 context, 3
targets, a fraction of a second, so that the burst is over while its retry tickets are young): a burst of
N plain requests at once, then --trickle S seconds of one plain request a second (no ticket, no retry),
each sent when /metrics says the engine runs no job: 503s on an idle engine (goal 0), and the project's
client (service.client.Client, 3 retries) right after a second burst.
Loopback only; bounded by --requests, --max-seconds, --burst and --trickle.

    python bench/load_service.py                         # 200 requests per level, sampling only
    python bench/load_service.py --with-ll               # also each sample's log-likelihood (much slower)
    python bench/load_service.py --requests 40 --max-seconds 120 --workers 1 --max-queue 8
    python bench/load_service.py --concurrency 16 --requests 100 --burst 30 --trickle 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ingest.region import MEMPHIS as R  # noqa: E402
from service.cli import stop  # noqa: E402


def body(with_ll: bool, seed: int = 0) -> bytes:
    """1000 context / 245 targets drawn (seeded) from the circle; smooth plausible values in ERA5 units."""
    idx = np.random.default_rng(seed).permutation(R.n_points)
    ci, ti = idx[:1000], idx[1000:]
    lat, lon = R.circle_lat[ci], R.circle_lon[ci]
    values = {"sp": (100500.0 - 120.0 * (lat - 35)).tolist(), "t2m": (276.0 - 0.9 * (lat - 35)).tolist(),
              "u10": (3.0 + 0.1 * (lat - 35)).tolist(), "v10": (-1.0 + 0.1 * (lon + 91)).tolist()}
    include = ["samples", "mean", "std", "quantiles"] + (["log_likelihood"] if with_ll else [])
    return json.dumps({"context": {"latitude": lat.tolist(), "longitude": lon.tolist(), "values": values},
                       "targets": {"latitude": R.circle_lat[ti].tolist(), "longitude": R.circle_lon[ti].tolist()},
                       "num_samples": 8, "steps": 16, "seed": 0, "include": include}).encode()


def start_server(port: int, workers: int, max_queue: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWNP_")}
    env.update(FLOWNP_WORKERS=str(workers), FLOWNP_MAX_QUEUE=str(max_queue))
    return subprocess.Popen([sys.executable, "-m", "service.cli", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env)


async def level(url: str, payload: bytes, n: int, conc: int, max_s: float) -> dict:
    lat: list[float] = []
    status: dict[int, int] = {}
    issued = 0
    t_end = time.perf_counter() + max_s

    async def worker(client: httpx.AsyncClient) -> None:
        """Sends requests until n have been issued; a 503 is counted, then the same request is retried
        after Retry-After with the server's X-Retry-Ticket (its latency runs from the first try)."""
        nonlocal issued
        while issued < n and time.perf_counter() < t_end:
            issued += 1
            t0 = time.perf_counter()
            headers = {"content-type": "application/json"}
            while time.perf_counter() < t_end:
                try:
                    r = await client.post("/v1/extrapolate", content=payload, headers=headers)
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                status[code] = status.get(code, 0) + 1
                if code != 503:
                    break
                if "x-retry-ticket" in r.headers:
                    headers = {**headers, "x-retry-ticket": r.headers["x-retry-ticket"]}
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
            if code == 200:
                lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(conc)))
    wall = time.perf_counter() - t0
    ok = status.get(200, 0)
    q = np.percentile(lat, [50, 99]) if lat else [float("nan")] * 2
    fair = conc * wall / ok if ok else float("nan")  # clients / throughput
    return {"concurrency": conc, "attempts": sum(status.values()), "ok": ok, "wall_s": round(wall, 1),
            "throughput_rps": round(ok / wall, 3), "p50_s": round(float(q[0]), 3), "p99_s": round(float(q[1]), 3),
            "fair_share_s": round(fair, 3), "p99_over_fair_share": round(float(q[1]) / fair, 3),
            "errors": {str(k): v for k, v in sorted(status.items()) if k != 200},
            "server_errors_5xx_other_than_503": sum(v for k, v in status.items() if k >= 500 and k != 503)}


def engine_jobs(c: httpx.Client) -> float:
    """flownp_engine_jobs from /metrics: model jobs running or queued."""
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("flownp_engine_jobs "):
            return float(line.split()[1])
    raise RuntimeError("no flownp_engine_jobs in /metrics")


async def _burst(url: str, payload: bytes, n: int) -> dict[str, int]:
    """n plain requests at once (no ticket, no retry): status counts."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        rs = await asyncio.gather(*(client.post("/v1/extrapolate", content=payload,
                                                headers={"content-type": "application/json"}) for _ in range(n)))
    out: dict[str, int] = {}
    for r in rs:
        out[str(r.status_code)] = out.get(str(r.status_code), 0) + 1
    return out


EXAMPLE = ROOT / "service" / "examples" / "extrapolate.json"


def burst_then_trickle(url: str, payload: bytes, n: int, seconds: float) -> dict:
    """The review's lockout scenario (D1): a burst, then one plain request a second sent to an idle engine;
    then a second burst and one request through service.client.Client (3 retries with its ticket)."""
    from service.client import Client, ServiceError

    first = asyncio.run(_burst(url, payload, n))
    trickle: dict[str, int] = {}
    idle_503 = sent = 0
    with httpx.Client(base_url=url, timeout=300) as c:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            while engine_jobs(c) > 0 and time.perf_counter() < t_end:  # send only to an idle engine
                time.sleep(0.05)
            r = c.post("/v1/extrapolate", content=payload, headers={"content-type": "application/json"})
            sent += 1
            trickle[str(r.status_code)] = trickle.get(str(r.status_code), 0) + 1
            idle_503 += r.status_code == 503
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
    second = asyncio.run(_burst(url, payload, n))
    with Client(url, retries=3) as cl:
        try:
            cl.extrapolate_json(json.loads(payload))
            client = "ok"
        except ServiceError as exc:
            client = f"failed: {exc}"
    return {"burst": n, "burst_statuses": first, "trickle_sent": sent, "trickle_statuses": trickle,
            "idle_engine_503": idle_503, "second_burst_statuses": second, "python_client_after_burst": client}


def served_over_engine(url: str, payload: bytes, repeats: int) -> dict:
    """Client wall time of one request over the engine's own time (the server's `timing.engine_ms`)."""
    rows = []
    with httpx.Client(base_url=url, timeout=300) as c:
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = c.post("/v1/extrapolate", content=payload, headers={"content-type": "application/json"})
            wall = time.perf_counter() - t0
            r.raise_for_status()
            rows.append((wall, r.json()["timing"]["engine_ms"] / 1e3))
    ratios = [w / e for w, e in rows]
    i = int(np.argsort(ratios)[len(ratios) // 2])
    return {"served_s": round(rows[i][0], 4), "engine_s": round(rows[i][1], 4), "ratio_median": round(ratios[i], 4),
            "ratios": [round(x, 4) for x in ratios]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=200, help="Requests per concurrency level.")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--max-seconds", type=float, default=600, help="Stop issuing requests in a level after this.")
    p.add_argument("--workers", type=int, default=1, help="Server FLOWNP_WORKERS.")
    p.add_argument("--max-queue", type=int, default=8, help="Server FLOWNP_MAX_QUEUE.")
    p.add_argument("--with-ll", action="store_true", help="Include each sample's log-likelihood.")
    p.add_argument("--ratio-repeats", type=int, default=5, help="Sequential requests for the ratio (0: skip).")
    p.add_argument("--burst", type=int, default=0, help="Burst-then-trickle scenario: burst size (0: skip).")
    p.add_argument("--trickle", type=float, default=20.0, help="Seconds of one request a second after the burst.")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, args.workers, args.max_queue)
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        payload = body(args.with_ll)
        info = {"request": "1000 context / 245 targets, 8 samples, euler 16 steps"
                + (", log-likelihood midpoint 8 steps" if args.with_ll else ", no log-likelihood"),
                "body_bytes": len(payload), "workers": args.workers, "max_queue": args.max_queue,
                "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg()}
        print(json.dumps(info), flush=True)
        if args.ratio_repeats > 0:
            print(json.dumps({"served_over_engine": served_over_engine(url, payload, args.ratio_repeats)}), flush=True)
        for conc in (int(c) for c in args.concurrency.split(",")):
            res = asyncio.run(level(url, payload, args.requests, conc, args.max_seconds))
            print(json.dumps(res), flush=True)
        if args.burst > 0:
            out = burst_then_trickle(url, EXAMPLE.read_bytes(), args.burst, args.trickle)
            print(json.dumps({"burst_then_trickle": {"request": EXAMPLE.name, **out}}), flush=True)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
