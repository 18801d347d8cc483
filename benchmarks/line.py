"""The line's figures (issue "On the line"), each with the project's own ``clipfusion watch`` process:

- ``video``: frames per second of a 1080p H.264 video at ``--every 1``, tiny and ``fast`` (full-size
  architectures, random weights), steady (first row to last) and from process start, with the default
  ``--pictures ng`` (overlays of NG frames only) and with ``--pictures all``; beside it PyAV's decoding
  alone of the same video (the ceiling a feed can give).
- ``latency``: a file renamed into the watched folder → its MQTT message at a subscriber (Debian's mosquitto
  on loopback), p50/p95, at the default ``--settle 1`` and at ``--settle 0.1``; files one at a time.
- ``drain``: a backlog built while the broker is down (600 verdicts: a 5-minute outage at 2 parts/s), then
  the broker back: verdicts delivered per second until the outbox is empty.

Usage: python benchmarks/line.py [--parts video latency drain] [--out benchmarks/results/line.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from _common import clipfusion_command, make_model

from clipfusion.config import RuntimeConfig
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.images import to_rgb
from clipfusion.resampling import resize_image
from clipfusion.tasks.benchmark import machine_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.servers import Subscriber, start_broker  # the tests' own mosquitto and subscriber

PARTS = ("video", "latency", "drain")
FRAMES = {"tiny": 90, "fast": 12}


def rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for(condition, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark's watch did not get there in time")
        time.sleep(0.005)


def write_1080p(path: Path, pictures: list[np.ndarray], frames: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        for index in range(frames):
            picture = resize_image(pictures[index % len(pictures)], (1080, 1920))
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_fps(path: Path) -> float:
    import av

    start, count = time.perf_counter(), 0
    with av.open(str(path)) as container:
        container.streams.video[0].thread_type = "AUTO"
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
            count += 1
    return round(count / (time.perf_counter() - start), 1)


def video_part(models: dict[str, Path], pictures: list[np.ndarray], folder: Path) -> list[dict]:
    results = []
    for preset, model in models.items():
        video = folder / f"line-{preset}.mp4"
        write_1080p(video, pictures, FRAMES[preset])
        for kept in ("ng", "all"):
            out = folder / f"video-{preset}-{kept}"
            start = time.time()
            subprocess.run([clipfusion_command(), "watch", str(video), "--model", str(model), "--out", str(out),
                            "--pictures", kept, "--quiet"], check=True)
            total = time.time() - start
            scored = rows(out)
            times = [datetime.fromisoformat(row["timestamp"]).timestamp() for row in scored]
            steady = (len(times) - 1) / (times[-1] - times[0])
            results.append({"preset": preset, "pictures": kept, "frames": len(times), "resolution": "1920x1080",
                            "every": 1, "ng_frames": sum(row["decision"] == "NG" for row in scored),
                            "steady_fps": round(steady, 2), "fps_from_process_start": round(len(times) / total, 2),
                            "process_seconds": round(total, 1), "pyav_decode_only_fps": decode_fps(video)})
            print(results[-1], flush=True)
    return results


def latency_part(model: Path, image: Path, folder: Path) -> list[dict]:
    results = []
    for settle in ("1", "0.1"):
        broker = start_broker(folder / f"broker-{settle}")
        subscriber = Subscriber(broker.port, "line/latency")
        incoming, out = folder / f"incoming-{settle}", folder / f"latency-{settle}"
        incoming.mkdir()
        watch = subprocess.Popen([clipfusion_command(), "watch", str(incoming), "--model", str(model), "--out",
                                  str(out), "--settle", settle, "--publish",
                                  f"mqtt://127.0.0.1:{broker.port}/line/latency", "--after", "move", "--quiet"])
        latencies = []
        try:
            for number in range(25):
                staged = folder / f"staged-{number}.png"
                shutil.copy(image, staged)
                had = len(subscriber.messages)
                dropped = time.perf_counter()
                staged.rename(incoming / f"part-{number}.png")
                wait_for(lambda had=had, subscriber=subscriber: len(subscriber.messages) > had, 120)
                latencies.append(1000 * (time.perf_counter() - dropped))
        finally:
            watch.send_signal(signal.SIGTERM)
            watch.wait(timeout=60)
            subscriber.close()
            broker.stop()
        ordered = sorted(latencies[1:])  # the first waits for the model's first pass
        results.append({"settle_s": float(settle), "poll_s": 0.5, "files": len(ordered),
                        "p50_ms": round(statistics.median(ordered), 1),
                        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 1)})
        print(results[-1], flush=True)
    return results


def drain_part(model: Path, image: Path, folder: Path, backlog: int = 600) -> dict:
    broker = start_broker(folder / "broker-drain")
    subscriber = Subscriber(broker.port, "line/drain")
    broker.stop()  # the outage
    incoming, out = folder / "incoming-drain", folder / "drain"
    incoming.mkdir()
    staging = folder / "staging-drain"
    staging.mkdir()
    for number in range(backlog):
        shutil.copy(image, staging / f"part-{number:04d}.png")
    watch = subprocess.Popen([clipfusion_command(), "watch", str(incoming), "--model", str(model), "--out", str(out),
                              "--publish", f"mqtt://127.0.0.1:{broker.port}/line/drain", "--batch-size", "16",
                              "--quiet"])
    try:
        for path in sorted(staging.iterdir()):
            path.rename(incoming / path.name)
        wait_for(lambda: len(rows(out)) == backlog, 600)
        broker.start()
        start = time.perf_counter()
        wait_for(lambda: len(subscriber.ids()) >= 1, 60)
        first = time.perf_counter()
        wait_for(lambda: len(subscriber.ids()) >= backlog, 600)
        seconds, draining = time.perf_counter() - start, time.perf_counter() - first
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=60)
        subscriber.close()
        broker.stop()
    result = {"backlog": backlog, "seconds_to_empty_after_broker_back": round(seconds, 2),
              "seconds_to_first_message": round(first - start, 2),
              "drain_messages_per_s": round((backlog - 1) / draining, 1),
              "note": "the first message waits for the outbox's next try (its backoff reaches 5 s in a long "
                      "outage) and the reconnection; then one PUBACK round trip per message, in order"}
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--presets", nargs="+", default=["tiny", "fast"], choices=["tiny", "fast"])
    parser.add_argument("--out", default="benchmarks/results/line.json")
    args = parser.parse_args()
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        root = generate(folder / "data", SyntheticSpec(categories=("disc",), image_size=256, n_train=3),
                        progress=False)
        tests = sorted((root / "disc" / "test").rglob("*.png"))
        models = {preset: make_model(preset, root / "disc" / "train" / "good", folder / f"{preset}.cfm")
                  for preset in args.presets}
        if "video" in args.parts:
            figures["video"] = video_part(models, [to_rgb(path) for path in tests], folder)
        if "latency" in args.parts:
            figures["latency"] = latency_part(models["tiny"], tests[0], folder)
        if "drain" in args.parts:
            figures["drain"] = drain_part(models["tiny"], tests[0], folder)
    figures["machine"] = machine_info(RuntimeConfig())
    figures["note"] = ("tiny preset for latency and drain; 256x256 PNG files; mosquitto and the watch share this "
                       "machine's CPUs; fast = full-size architectures with random weights (speed only)")
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
