"""`vllm serve` subprocesses for tests/test_server.py (and the padded-vocabulary value model one of
its launches must refuse): start one in its own process group with its
log in a file, wait for /health or for an exit, read the plugin's "VAS idle" log line, and stop
the whole group (API server, engine core, worker) whatever happens."""
from __future__ import annotations

import ast
import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 600  # every launch of the module starts at once on 2 cores shared with other jobs
IDLE_RE = re.compile(r"VAS idle: slots_in_use=(\{[^}]*\}) counters=(\{[^}]*\})")

# ---- processes ---------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def server_env() -> dict[str, str]:
    # dev mode exposes POST /collective_rpc (vas_stats), on loopback only
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_SERVER_DEV_MODE": "1"}


class Launch:
    """`python -m vas_vllm.serve GENERATOR --host 127.0.0.1 --port PORT ARGS` in its own process
    group, output in a file."""

    def __init__(self, name: str, generator: Path, args: list[str], log: Path, port: int = 0,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log, self.port = name, log, port
        self.cmd = [sys.executable, "-m", "vas_vllm.serve", str(generator), "--host", "127.0.0.1",
                    "--port", str(port), *args]
        self.started = time.monotonic()
        self.exited_after: float | None = None  # seconds from start to exit, once it exits
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**server_env(), **(env or {})}, start_new_session=True,
                cwd=Path(__file__).resolve().parents[1])
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.proc.wait()
        self.exited_after = time.monotonic() - self.started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> float:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode} before "
                                   f"/health answered; log {self.log}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server {self.name}: no 200 from /health after {timeout:.0f} s; "
                           f"log {self.log}:\n{self.tail()}")

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        left = max(self.started + timeout - time.monotonic(), 1.0)
        try:
            code = self.proc.wait(timeout=left)
            if self.exited_after is None:  # the watcher thread has not recorded it yet
                self.exited_after = time.monotonic() - self.started
            return code
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name}: still running after {timeout:.0f} s (expected an early "
                               f"start-up failure); log {self.log}:\n{self.tail()}") from None

    def stop(self) -> None:
        """SIGTERM the whole process group (API server, engine core, worker), then SIGKILL."""
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return  # the group is gone: nothing left to stop
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            if not group_alive(self.proc.pid):
                return
            time.sleep(1.0)

    # ---- the plugin's idle log line --------------------------------------------------------
    def idle_lines(self) -> list[tuple[dict[str, int], dict[str, int]]]:
        return [(ast.literal_eval(a), ast.literal_eval(b)) for a, b in IDLE_RE.findall(self.text())]

    def wait_idle_line(self, after: int, until: Any = None, timeout: float = 30.0,
                       ) -> tuple[dict[str, int], dict[str, int]]:
        """The newest "VAS idle" line beyond the first `after` ones, once one exists for which
        `until(slots, counters)` holds. The processor logs one whenever its last VAS row leaves
        the batch, so a row that never left (leaked) would never let a new one appear."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.idle_lines()[after:]
            if lines and (until is None or until(*lines[-1])):
                return lines[-1]
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no new 'VAS idle' log line (beyond {after}) matching the "
                    f"expectation within {timeout} s; newest: {lines[-1] if lines else None}; "
                    f"a VAS row never left the processor's table?\n{self.tail(20)}")
            time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


LAUNCHES: list[Launch] = []


def launch(*args: Any, **kwargs: Any) -> Launch:
    started = Launch(*args, **kwargs)
    LAUNCHES.append(started)
    return started


def stop_all() -> None:
    for launch in LAUNCHES:
        launch.stop()


atexit.register(stop_all)  # a second line of defence; the fixture's finally is the first


def padded_vocab_value_model(generator: Path, out: Path) -> Path:
    """A value model made (make_value_model) for a generator whose vocabulary is padded to
    49216 rows: same tokenizer as the served generator (49152), another logits width."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from value_models.checkpoint import make_value_model

    tok = AutoTokenizer.from_pretrained(generator)
    padded = out / "padded-generator"
    config = LlamaConfig(vocab_size=len(tok) + 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         architectures=["LlamaForCausalLM"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(padded)
    tok.save_pretrained(padded)
    return make_value_model(padded, out / "value-vocab-49216", num_layers=1)
