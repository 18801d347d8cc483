"""Throughput and latency of ``clipfusion serve`` with dynamic batching on and off, at 1, 4 and 16
concurrent clients, for the tiny preset and for ``fast`` (full-size architectures, random weights);
and the HTTP + decoding + files + database overhead per image as a share of the model's own time
(the time in the detector as the service measures it, ``clipfusion_model_seconds``).

Every figure comes from one run on this machine: the service is started with the project's own
command on 127.0.0.1, clients post one synthetic image per request.
Usage: python benchmarks/serve.py [--presets tiny fast] [--out benchmarks/results/serve.json]
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from _common import clipfusion_command, make_model

from clipfusion.config import RuntimeConfig
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.tasks.benchmark import machine_info

CLIENTS = (1, 4, 16)
# images per client count: enough for a steady figure, few enough for the slow preset
REQUESTS = {"tiny": {1: 40, 4: 80, 16: 160}, "fast": {1: 4, 4: 8, 16: 16}}
def serve(model: Path, data: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([clipfusion_command(), "serve", "--model", str(model), "--data", str(data), "--port",
                                str(port), "--max-batch", str(max_batch), "--max-wait-ms", "10", "--max-queue",
                                "256", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service did not start")


def load(url: str, image: bytes, clients: int, total: int) -> dict[str, float]:
    """``clients`` threads share ``total`` requests of one image each: images/s, mean latency and percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    remaining = [total]

    def client() -> None:
        with httpx.Client(timeout=600) as session:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                answer = session.post(f"{url}/v1/models/model/inspect", files={"files": ("p.png", image, "image/png")})
                answer.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    p50, p95 = np.percentile(latencies, [50, 95])
    return {"images_per_s": round(total / elapsed, 2), "mean_ms": round(1000 * float(np.mean(latencies))),
            "p50_ms": round(1000 * p50), "p95_ms": round(1000 * p95)}


def model_seconds(url: str) -> tuple[float, float]:
    """The service's own record of time in the detector: (sum of seconds, number of batches)."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(("clipfusion_model_seconds_sum", "clipfusion_model_seconds_count")):
            values[line.split("{")[0]] = float(line.split()[-1])
    return values["clipfusion_model_seconds_sum"], values["clipfusion_model_seconds_count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "fast"], choices=["tiny", "fast"])
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        root = generate(Path(folder) / "data", SyntheticSpec(categories=("disc",), image_size=256, n_train=3),
                        progress=False)
        image_path = sorted((root / "disc" / "test" / "good").iterdir())[0]
        image = image_path.read_bytes()
        for preset in args.presets:
            model = make_model(preset, root / "disc" / "train" / "good", Path(folder) / "model.cfm")
            for batching, max_batch in (("on", 8), ("off", 1)):
                process, url = serve(model, Path(folder) / f"serve-{preset}-{batching}", max_batch)
                try:
                    load(url, image, 1, 2)  # warm-up
                    for clients in CLIENTS:
                        before = model_seconds(url)
                        result = load(url, image, clients, REQUESTS[preset][clients])
                        after = model_seconds(url)
                        # time in the detector per image, as the service itself measured it in this run
                        per_image = (after[0] - before[0]) / REQUESTS[preset][clients]
                        run = {"preset": preset, "batching": batching, "clients": clients, **result,
                               "model_ms_per_image": round(1000 * per_image), "batches": int(after[1] - before[1])}
                        print(json.dumps(run), flush=True)
                        runs.append(run)
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=120)
    for run in runs:  # one client, no batching: the latency is the model plus everything else
        if run["clients"] == 1 and run["batching"] == "off":
            # mean against mean over the same requests (the service's model time is a sum): a median latency of
            # 4 slow-preset requests against a mean model time came out below it, at -2.5 %
            run["overhead_share"] = round((run["mean_ms"] - run["model_ms_per_image"]) / run["model_ms_per_image"], 3)
    result = {"runs": runs, "machine": machine_info(RuntimeConfig()),
              "note": "fast: full-size architectures with random weights (speed does not depend on weights); "
                      "one 256x256 PNG per request; the service and the clients share this machine's CPUs"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| preset | batching | clients | images/s | mean ms | p50 ms | p95 ms | batches | model ms/image "
             "| overhead |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        share = f"{100 * run['overhead_share']:.1f} %" if "overhead_share" in run else ""
        lines.append(f"| {run['preset']} | {run['batching']} | {run['clients']} | {run['images_per_s']} | "
                     f"{run['mean_ms']} | {run['p50_ms']} | {run['p95_ms']} | {run['batches']} | "
                     f"{run['model_ms_per_image']} | {share} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
