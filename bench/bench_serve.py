"""Load test of `vl3 serve`: many concurrent clients against one server, on the tiny test checkpoint.

    python bench/bench_serve.py                       # 32 clients for 20 s, --max-batch 8
    python bench/bench_serve.py --clients 64 --seconds 60 --max-batch 16

It starts `vl3 serve` on 127.0.0.1, asks every distinct request once, one at a time (the
sequential answers and the one-client throughput), then lets `--clients` threads send requests
in a loop for `--seconds` (each waits for its answer before the next). Every concurrent answer
must equal the sequential answer to the same request (greedy decoding); lost requests (errors,
timeouts) and mismatches are counted. The table compares requests/s and tokens/s with one
client at a time. The checkpoint is tiny, so the figures measure the server and the batching
loop, not a real model's speed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import tiny  # noqa: E402
from media_factory import make_image  # noqa: E402


def post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def requests_(folder: Path, tokens: int) -> list[dict]:
    """Distinct requests: 8 images x 2 questions, and 2 text-only ones."""
    bodies = []
    for i in range(8):
        path = make_image(folder / f"img{i}.png", size=(28 + 14 * (i % 4), 56), seed=i)
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        for q in ("What is it?", "Which colours?"):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
            bodies.append({"messages": [{"role": "user", "content": content}], "max_tokens": tokens})
    for q in ("Say something.", "What colour is a banana?"):
        bodies.append({"messages": [{"role": "user", "content": q}], "max_tokens": tokens})
    return bodies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = tiny.make_checkpoint(folder / "ckpt", "hf", tied=True, seed=0)
        bodies = requests_(folder, args.max_tokens)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "vl3cli", "serve", "-m", str(ckpt), "--port", str(port), "--max-batch", str(args.max_batch),
             "--max-queue", str(args.clients)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k != "VL3_API_KEY"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start:\n{server.stderr.read()}") from None
                    time.sleep(0.1)

            post(url, bodies[0])  # warm-up
            start = time.perf_counter()
            expected, seq_latency, seq_tokens = [], [], 0
            for body in bodies:
                t = time.perf_counter()
                r = post(url, body)
                seq_latency.append(time.perf_counter() - t)
                expected.append(r["choices"][0]["message"]["content"])
                seq_tokens += r["usage"]["completion_tokens"]
            seq_seconds = time.perf_counter() - start

            lock = threading.Lock()
            answered, lost, mismatched, latencies, tokens = 0, 0, 0, [], 0
            stop_at = time.monotonic() + args.seconds

            def client(n: int) -> None:
                nonlocal answered, lost, mismatched, tokens
                i = n
                while time.monotonic() < stop_at:
                    body = bodies[i % len(bodies)]
                    t = time.perf_counter()
                    try:
                        r = post(url, body)
                    except Exception:  # noqa: BLE001 -- a lost request is what we count
                        with lock:
                            lost += 1
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        answered += 1
                        tokens += r["usage"]["completion_tokens"]
                        mismatched += r["choices"][0]["message"]["content"] != expected[i % len(bodies)]
                    i += 7

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            conc_seconds = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=30)

    def q(values, p):
        return sorted(values)[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    seq_rps, conc_rps = len(bodies) / seq_seconds, answered / conc_seconds
    print(f"\nvl3 serve load test: tiny checkpoint, --max-batch {args.max_batch}, {args.max_tokens} tokens per answer, "
          f"{len(bodies)} distinct requests\n")  # fmt: skip
    print("| clients | requests answered | lost | answers differing from sequential | requests/s | tokens/s | latency p50 | latency p95 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 1 (sequential) | {len(bodies)} | 0 | - | {seq_rps:.2f} | {seq_tokens / seq_seconds:.1f} | "
          f"{statistics.median(seq_latency):.3f} s | {q(seq_latency, 0.95):.3f} s |")  # fmt: skip
    print(f"| {args.clients} | {answered} | {lost} | {mismatched} | {conc_rps:.2f} | {tokens / conc_seconds:.1f} | "
          f"{statistics.median(latencies) if latencies else float('nan'):.3f} s | {q(latencies, 0.95):.3f} s |")  # fmt: skip
    print(f"\nthroughput: {conc_rps / seq_rps:.2f}x requests/s of one client at a time")
    if lost or mismatched:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
