"""Load on `cliplab serve`: ``--clients`` concurrent clients for ``--seconds`` against a server
on loopback, text and image queries mixed (every ``--image-every``-th request of a client
uploads a collection image). Reports requests, errors (any non-200 or transport failure),
throughput and p50/p99 latency as one JSON line; the target is zero errors.

Without ``--index``, builds a small one first (tiny-clip preset on 1000 `shapes` scenes).

    python benchmarks/serve_load.py                       # 50 clients, 30 s
    python benchmarks/serve_load.py --index runs/my-index --clients 20 --seconds 10
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_args import existing_dir, make_parser, positive_float, positive_int  # noqa: E402
from cli_args import require, run_main  # noqa: E402

TEXTS = [f"a {size} {color} {shape}" for size in ("small", "large")
         for color in ("red", "green", "blue", "yellow", "purple", "cyan")
         for shape in ("circle", "square", "triangle", "cross")]


def build_small_index(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "cliplab", "index", "--model", "tiny-clip", "--data",
                    "shapes", "--out", str(out), "--no-progress", "data.n=1000",
                    "data.image_size=64"], check=True, stdout=sys.stderr)  # stdout: the JSON only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if server.poll() is not None:
            raise SystemExit(f"cliplab serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no answer from {url} in {seconds} s")


async def client(http, base: str, images: list[bytes], seconds: float, image_every: int,
                 seed: int, records: list) -> None:
    rng = random.Random(seed)
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        kind = "image" if n % image_every == image_every - 1 else "text"
        start = time.perf_counter()
        try:
            if kind == "text":
                r = await http.get(f"{base}/api/search", params={
                    "q": rng.choice(TEXTS), "k": 10, "offset": rng.choice((0, 0, 10))})
            else:
                r = await http.post(f"{base}/api/search/image", params={"k": 10},
                                    files={"file": ("q.png", rng.choice(images), "image/png")})
            ok = r.status_code == 200 and len(r.json()["results"]) > 0
        except Exception:  # noqa: BLE001 - every failure counts as an error
            ok = False
        records.append((kind, time.perf_counter() - start, ok))
        n += 1


def summary(records: list, seconds: float) -> dict:
    def stats(rows):
        lat = np.asarray([r[1] for r in rows]) * 1000 if rows else np.zeros(1)
        return {"requests": len(rows), "errors": sum(not r[2] for r in rows),
                "p50_ms": round(float(np.percentile(lat, 50)), 1),
                "p99_ms": round(float(np.percentile(lat, 99)), 1)}
    out = stats(records)
    out["throughput_rps"] = round(len(records) / seconds, 1)
    out["text"] = stats([r for r in records if r[0] == "text"])
    out["image"] = stats([r for r in records if r[0] == "image"])
    return out


async def run_load(base: str, clients: int, seconds: float, image_every: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        images = [(await http.get(f"{base}/images/{i}")).content for i in range(8)]
        records: list = []
        start = time.monotonic()
        await asyncio.gather(*(client(http, base, images, seconds, image_every, seed, records)
                               for seed in range(clients)))
        return summary(records, time.monotonic() - start)


def main() -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--index", type=existing_dir,
                        help="index folder (default: build a small one)")
    parser.add_argument("--clients", type=positive_int, default=50, help="concurrent clients")
    parser.add_argument("--seconds", type=positive_float, default=30,
                        help="how long every client sends requests")
    parser.add_argument("--image-every", type=positive_int, default=4,
                        help="every Nth request of a client is an image upload")
    args = parser.parse_args()
    # the load client (httpx) and what cliplab index / serve need: said before the index build
    require(parser, "httpx", "faiss", "fastapi", "uvicorn")
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(args.index) if args.index else Path(tmp) / "index"
        if not args.index:
            build_small_index(index)
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "cliplab", "serve", str(index),
                                   "--port", str(port)], stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(f"{base}/api/health", server)
            result = asyncio.run(run_load(base, args.clients, args.seconds, args.image_every))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({"clients": args.clients, "seconds": args.seconds,
                      "image_every": args.image_every, **result}))


if __name__ == "__main__":
    run_main(main)
