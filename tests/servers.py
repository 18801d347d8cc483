"""Starting the project's own ``clipfusion serve`` on a loopback port, and PostgreSQL on a temporary
folder (``initdb`` + ``pg_ctl``), for the service tests.  Everything binds to 127.0.0.1 and stops
by itself."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_server(models: list[Path], data: Path, *extra: str, log: Path | None = None,
                 timeout: float = 180, port: int | None = None) -> Server:
    """``clipfusion serve`` in a subprocess (on ``port``, default a free one), returned once /readyz answers 200."""
    port = port or free_port()
    log = log or data.with_name(data.name + ".log")
    script = Path(sys.executable).with_name("clipfusion")
    command = [str(script), "serve", *(arg for m in models for arg in ("--model", str(m))), "--data", str(data),
               "--host", "127.0.0.1", "--port", str(port), *extra]
    with log.open("ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"clipfusion serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Server(process, url, log)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"clipfusion serve was not ready within {timeout} s: {log.read_text()[-2000:]}")


def _postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{name} not found: scripts/test.sh installs Debian's postgresql")
    return found


@dataclass
class Postgres:
    folder: Path
    port: int
    run_as: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run([*self.run_as, _postgres_bin("pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres() -> Postgres:
    """A throw-away PostgreSQL server on 127.0.0.1 (trust authentication, data in a new temporary
    folder that ``stop`` deletes).  As root, the server runs as the ``postgres`` user, which initdb
    requires; its folder is then outside pytest's root-only temporary tree."""
    folder = Path(tempfile.mkdtemp(prefix="clipfusion-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    port = free_port()
    data, sockets = folder / "data", folder
    subprocess.run([*run_as, _postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    options = f"-p {port} -h 127.0.0.1 -k {sockets} -c fsync=off"
    subprocess.run([*run_as, _postgres_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "pg.log"),
                    "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=90)
    return Postgres(folder, port, run_as)


@dataclass
class Broker:
    """Debian's mosquitto on a loopback port, persisting its sessions in ``folder`` (so that a restart on
    the same port keeps subscribers' queued messages, as a production broker does)."""

    folder: Path
    port: int
    process: subprocess.Popen | None = None

    def start(self) -> Broker:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).is_file():
            raise RuntimeError("mosquitto not found: scripts/test.sh installs Debian's mosquitto")
        config = self.folder / "mosquitto.conf"
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                          f"persistence_location {self.folder}/\nuser root\n")
        with (self.folder / "mosquitto.log").open("ab") as log:
            self.process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"mosquitto did not listen: {(self.folder / 'mosquitto.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # mosquitto saves its sessions on the way out
            self.process.wait(timeout=30)


def start_broker(folder: Path) -> Broker:
    folder.mkdir(parents=True, exist_ok=True)
    return Broker(folder, free_port()).start()


def _listening(port: int) -> bool:
    """Whether a socket listens on loopback ``port`` (state 0A in /proc/net/tcp)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(f.split()[1].endswith(f":{port:04X}") and f.split()[3] == "0A" for f in lines)


@dataclass
class Stream:
    """A live stream served by Debian's ffmpeg on a loopback port (``-listen 1``: one client), in real time."""

    arguments: list[str]  # ffmpeg's input and encoding options
    port: int
    container: str
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/live"

    def start(self) -> Stream:
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            raise RuntimeError("ffmpeg not found: scripts/test.sh installs Debian's ffmpeg")
        self.process = subprocess.Popen([ffmpeg, "-loglevel", "error", "-re", *self.arguments, "-f", self.container,
                                         "-listen", "1", self.url], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a probe connection would be its one client: ask the kernel instead
            if _listening(self.port):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"ffmpeg did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def start_stream(arguments: list[str], container: str = "mpegts") -> Stream:
    """ffmpeg serving ``arguments`` (input and codec options) over HTTP on a free loopback port."""
    return Stream(arguments, free_port(), container).start()


class Subscriber:
    """A persistent-session MQTT subscriber (QoS 1) collecting every message on ``topic``."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[dict] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-subscriber", clean_session=False)
        self.client.on_connect = lambda client, *_: client.subscribe(topic, qos=1)
        self.client.on_message = self._received
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _received(self, _client, _userdata, message) -> None:
        with self.lock:
            self.messages.append(json.loads(message.payload))

    def ids(self) -> list[str]:
        """Message ids in order of first arrival (a message may come twice: at least once, same id)."""
        with self.lock:
            return list(dict.fromkeys(message["id"] for message in self.messages))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
