"""Service benchmark: `qsearch serve` on the 10,000-image index of scripts/bench_ui.py, under a bounded load
generator on 127.0.0.1, every request a different Flickr8k dev caption.

    python scripts/bench_service.py --images ../shared/data/flickr8k/images --n 10000 \
        --out docs/results/bench_service.json

Phases (end to end: HTTP, JSON, the engine):
  1. ITC only (rerank 0), one client: latency p50 / p95.
  2. ITC only, 8 concurrent clients: throughput.
  3. ITC + ITM re-ranking of 128 candidates, 4 concurrent clients: throughput and latency p95.
Every request counts towards the error total (any status but 200, or a transport error). The server's peak
resident memory (VmHWM) is read from /proc at the end. The load generator runs on the same machine.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def dev_captions(root: Path) -> list[str]:
    """Every caption of the Flickr8k dev images, in file order."""
    dev = set((root / "Flickr_8k.devImages.txt").read_text().split())
    out = []
    for line in (root / "Flickr8k.token.txt").read_text().splitlines():
        name, _, caption = line.partition("\t")
        if name.split("#")[0] in dev and caption.strip():
            out.append(" ".join(caption.split()))
    return out


def ensure_index(images: Path, n: int, work: Path, model: str | None) -> Path:
    """The bench_ui index (built once, shared with scripts/bench_ui.py)."""
    spec = importlib.util.spec_from_file_location("bench_ui", REPO / "scripts" / "bench_ui.py")
    bench_ui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ui)
    from indexer import Index, IndexConfig, build_index
    from qformer.factory import DEFAULT_MODEL, create_model

    index_dir = work / "index"
    if not (index_dir / "CURRENT").exists() or len(Index.open(index_dir)) < n:
        paths = bench_ui.collection(images, n, work)
        manifest = work / "manifest.csv"
        manifest.write_text("path\n" + "".join(f"{p.resolve()}\n" for p in paths))
        build_index(create_model(model or DEFAULT_MODEL), [manifest], index_dir, IndexConfig(num_workers=2),
                    progress=True)
    return index_dir


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Load:
    """Closed-loop clients: each sends its next query as soon as the previous answer arrives."""

    def __init__(self, base: str, captions: list[str]):
        self.base, self.captions, self.next = base, captions, 0
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.requests = 0

    def take(self) -> str:
        with self.lock:
            q = self.captions[self.next % len(self.captions)]
            self.next += 1
            return q

    def run(self, clients: int, total: int, body: dict, max_seconds: float) -> dict:
        latencies: list[float] = []
        left = [total]
        deadline = time.monotonic() + max_seconds

        def client() -> None:
            # one keep-alive connection per client; stdlib http.client costs the shared CPU less than httpx
            host, port = self.base.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                while True:
                    with self.lock:
                        if left[0] <= 0 or time.monotonic() > deadline:
                            return
                        left[0] -= 1
                    t = time.perf_counter()
                    try:
                        conn.request("POST", "/search", json.dumps({**body, "text": self.take()}),
                                     {"Content-Type": "application/json"})
                        r = conn.getresponse()
                        data = r.read()
                        ok = r.status == 200 and isinstance(json.loads(data), list)
                        err = None if ok else f"{r.status}: {data[:200]!r}"
                    except (OSError, http.client.HTTPException, ValueError) as e:
                        err = f"{type(e).__name__}: {e}"
                        conn.close()  # reconnects on the next request
                    dt = time.perf_counter() - t
                    with self.lock:
                        self.requests += 1
                        if err:
                            self.errors.append(err)
                        else:
                            latencies.append(dt)
            finally:
                conn.close()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        return {"clients": clients, "requests": len(latencies), "seconds": round(wall, 2),
                "qps": round(len(latencies) / wall, 2) if wall else 0.0,
                "p50_ms": round(1000 * pct(latencies, 50), 1) if latencies else None,
                "p95_ms": round(1000 * pct(latencies, 95), 1) if latencies else None,
                "max_ms": round(1000 * max(latencies), 1) if latencies else None}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="../shared/data/flickr8k/images")
    ap.add_argument("--captions", default="../shared/data/flickr8k", help="Flickr8k root (dev captions)")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--work", default="out/bench_ui", help="shared with scripts/bench_ui.py")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--itc-single", type=int, default=400, help="requests of phase 1")
    ap.add_argument("--itc-multi", type=int, default=1600, help="requests of phase 2")
    ap.add_argument("--itm", type=int, default=200, help="requests of phase 3")
    ap.add_argument("--max-seconds", type=float, default=150, help="per phase: a phase stops there")
    ap.add_argument("--out", default="docs/results/bench_service.json")
    args = ap.parse_args()

    index_dir = ensure_index(Path(args.images), args.n, Path(args.work), args.model)
    captions = dev_captions(Path(args.captions))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "search.cli", "serve", str(index_dir), "--host", "127.0.0.1",
                               "--port", str(port), "--device", args.device, "--log-level", "warning"],
                              cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit("qsearch serve exited")
            try:
                if httpx.get(f"{base}/health", timeout=2).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        startup = time.perf_counter() - t0
        info = httpx.get(f"{base}/info").json()
        load = Load(base, captions)
        load.run(1, 5, {"k": 10, "rerank": 0}, 60)  # warm-up (counted as requests, not timed)
        load.run(1, 1, {"k": 10, "rerank": 128}, 60)
        phases = {
            "itc_1_client": load.run(1, args.itc_single, {"k": 10, "rerank": 0}, args.max_seconds),
            "itc_8_clients": load.run(8, args.itc_multi, {"k": 10, "rerank": 0}, args.max_seconds),
            "itc_itm128_4_clients": load.run(4, args.itm, {"k": 10, "rerank": 128}, args.max_seconds),
        }
        for name, r in phases.items():
            print(f"{name:<22} {r['qps']:>7.2f} QPS   p50 {r['p50_ms']} ms   p95 {r['p95_ms']} ms   "
                  f"({r['requests']} requests in {r['seconds']} s)", flush=True)
        rss = peak_rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=120)

    import torch

    report = {
        "command": "python " + " ".join([f"scripts/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "device": args.device, "index_images": info["counts"]["images"], "model": info["model"]["name"],
        "http": "uvicorn, " + ", ".join(m if importlib.util.find_spec(m) else f"no {m}" for m in ("httptools", "uvloop")),
        "load_generator": "python http.client, one keep-alive connection and thread per client, same machine",
        "server_startup_s": round(startup, 1), "phases": phases,
        "requests": load.requests, "errors": len(load.errors), "error_samples": load.errors[:5],
        "server_peak_rss_mb": rss, "server_exit_status_after_sigterm": rc,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['requests']} requests, {report['errors']} errors; server peak RSS {rss} MB; exit status after "
          f"SIGTERM {rc}; wrote {args.out}")


if __name__ == "__main__":
    main()
