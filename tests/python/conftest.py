"""Daemons for the Python suites: the real binary (target/release/inferd), on free loopback
ports, started once per session and stopped at the end."""
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "target" / "release" / "inferd"
API_KEY = "sk-inferd-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """The binary on `model` (a file in models/) served as `name`; with `model=None`, the models
    come from a `--config` file in `extra`."""

    def __init__(self, model: str | None, name: str, *extra: str, port: int | None = None):
        assert BINARY.exists(), f"{BINARY} is missing: run `cargo build --release` first"
        served = []
        if model is not None:
            path = ROOT / "models" / model
            assert path.exists(), f"{path} is missing: run scripts/fetch-models.sh"
            served = ["--model", str(path), "--served-model-name", name]
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log = open(ROOT / "target" / f"pytest-{name}.log", "w")
        self.proc = subprocess.Popen(
            [str(BINARY), "serve", *served, "--port", str(self.port), "--api-key", API_KEY,
             *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 180
        while True:
            assert self.proc.poll() is None, f"inferd exited early; see {self.log.name}"
            try:
                with urllib.request.urlopen(self.base + "/ready", timeout=2) as r:
                    if json.load(r)["status"] == "ready":
                        return
            except OSError:  # not listening yet, or 503 while the model loads
                pass
            assert time.time() < deadline, "inferd did not become ready"
            time.sleep(0.2)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def qwen():
    d = Daemon("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen")
    yield d
    d.stop()


@pytest.fixture(scope="session")
def smol():
    """A small, fast model with a short context, so fuzzed requests stay cheap."""
    d = Daemon("SmolLM2-135M-Instruct.Q4_1.gguf", "smol", "--max-model-len", "96",
               "--kv-cache-memory", "64MiB")
    yield d
    d.stop()
