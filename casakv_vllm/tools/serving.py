"""Start and stop a real ``vllm serve`` on loopback, and talk to it over HTTP.

Used by ``casakv demo``, the end-to-end tests and the quality suite: one way
to run the server everywhere.  Only the standard library speaks HTTP here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    local = Path(sys.executable).with_name("vllm")
    if local.exists():
        return str(local)
    found = shutil.which("vllm")
    if not found:
        raise SystemExit("casakv: the `vllm` command was not found; install vLLM 0.32 (see README)")
    return found


def cpu_env(kv_cache_gib: int = 2) -> dict[str, str]:
    """Environment for the CPU build: a bounded KV-cache size."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}


@dataclass
class VllmServer:
    """A ``vllm serve`` child process on 127.0.0.1 (use as a context manager)."""

    model: str
    attention_backend: str | None = "casakv"
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    startup_timeout: float = 600.0
    log_path: Path | None = None
    served_name: str = "demo"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", self.served_name]
        if self.attention_backend:
            cmd += ["--attention-backend", self.attention_backend]
        return cmd + list(self.extra_args)

    def start(self) -> "VllmServer":
        if not self.port:
            self.port = free_port()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        env = {**os.environ, **self.env}
        if "CASAKV_METRICS_DIR" not in self.env:
            # each server gets its own metrics dir (created by its API server)
            env.pop("CASAKV_METRICS_DIR", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
            cwd=tempfile.gettempdir(), start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {self.startup_timeout:.0f}s; log tail:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        finally:
            self._log.close()

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP helpers -------------------------------------------------
    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def stream(self, path: str, payload: dict, timeout: float = 300.0) -> list[dict]:
        """POST with ``stream: true``; returns the parsed SSE events."""
        return list(self.iter_stream(path, payload, timeout))

    def iter_stream(self, path: str, payload: dict, timeout: float = 300.0):
        """POST with ``stream: true``; yields each SSE event as it arrives (for timing)."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps({**payload, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data:") and line != "data: [DONE]":
                    yield json.loads(line[5:])

    def get_text(self, path: str, timeout: float = 30.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()

    def chat(self, content: str, max_tokens: int = 32, **kw) -> dict:
        payload = {"model": self.served_name, "messages": [{"role": "user", "content": content}],
                   "max_tokens": max_tokens, "temperature": 0.0, **kw}
        return self.post("/v1/chat/completions", payload)

    def casakv_metrics(self) -> list[str]:
        return [ln for ln in self.get_text("/metrics").splitlines() if ln.startswith("casakv_")]

    def metric_values(self, names: list[str], settle_timeout: float = 10.0) -> dict[str, float]:
        """Values of Prometheus series ``names`` (summed over label sets), read
        once two consecutive scrapes agree: casakv workers publish every 0.1 s."""
        def scrape() -> dict[str, float]:
            text = self.get_text("/metrics")
            return {n: sum(float(m.group(1)) for m in
                           re.finditer(rf"^{re.escape(n)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M))
                    for n in names}

        last, deadline = scrape(), time.monotonic() + settle_timeout
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = scrape()
            if now == last:
                break
            last = now
        return last
