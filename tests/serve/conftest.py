"""A real index of ../shared/data/ukbench (300 images, longest side 256, default model, diffusion graph) and real
`python -m glimr serve` processes on free localhost ports, built and started once per test session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-7f3a9c1e"
MAX_SIZE = 256
UPLOAD_MB = 1                 # the servers' --max-upload-mb (the 413 tests send more)
MAX_PIXELS = 2_000_000        # the servers' --max-pixels


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, index: Path, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "glimr", "serve", str(index), "--port", str(self.port),
             "--max-upload-mb", str(UPLOAD_MB), "--max-pixels", str(MAX_PIXELS), "--log-level", "warning", *extra],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115

    def wait(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"glimr serve exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        pytest.fail(f"glimr serve did not answer /healthz within {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def ukb_index(shared_data, default_model, tmp_path_factory) -> Path:
    """All 300 UKBench images indexed at longest side 256 with the default model, plus the diffusion graph."""
    from glimr.index.build import build_index
    from glimr.index.store import IndexStore
    from glimr.rerank.diffusion import build_for_store

    index = tmp_path_factory.mktemp("serve") / "ukb-index"
    build_index(shared_data / "ukbench", index, default_model, max_size=MAX_SIZE, workers=0, progress=False)
    with IndexStore.open(index) as store:
        build_for_store(store, k=50)
    return index


@pytest.fixture(scope="session")
def serve_token() -> str:
    return TOKEN


@pytest.fixture(scope="session")
def serve_limits() -> dict:
    return {"upload_mb": UPLOAD_MB, "max_pixels": MAX_PIXELS, "max_size": MAX_SIZE}


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("serve-token") / "token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture(scope="session")
def servers(ukb_index, token_file, tmp_path_factory):
    """(writable server with the token, read-only server), both on the UKBench index, started together."""
    logs = tmp_path_factory.mktemp("serve-logs")
    rw = Server(ukb_index, logs / "rw.log", "--token-file", str(token_file))
    ro = Server(ukb_index, logs / "ro.log")
    try:
        yield rw.wait(), ro.wait()
    finally:
        rw.stop()
        ro.stop()


@pytest.fixture(scope="session")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="session")
def ro_server(servers) -> Server:
    return servers[1]
