"""Finished remote VAS texts on disk, written as they finish, so that a run that stops (a dropped
connection, a killed server, Ctrl-C) loses nothing and a rerun resumes.

The file is JSONL: a header line `{"remote_vas": SETTINGS}`, then one line per finished prompt
`{"index", "prompt", "text", "token_ids", "finish_reason", "requests"}` in the order they finish.
Each line is flushed and fsync'ed before the next step. On resume the header must equal the new
run's settings (same server model, value models, knobs, length, temperature) and each stored
prompt must be the prompt at its index; a torn last line (a crash mid-write) is dropped.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("vas_vllm.remote")
HEADER_KEY = "remote_vas"


class ResultFileError(ValueError):
    """The output file belongs to another run or is not a remote VAS result file."""


class ResultStore:
    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        # JSON round trip: tuples become lists, so a stored header compares equal
        self.settings = json.loads(json.dumps(settings))

    def load(self, prompts: list[Any]) -> dict[int, dict[str, Any]]:
        """Records already in the file, by prompt index (empty for a new file)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return {}
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        if lines and lines[-1] and not _parses(lines[-1]):
            logger.warning("%s: dropping a torn last line (%d bytes)", self.path, len(lines[-1]))
            with open(self.path, "r+b") as f:
                f.truncate(len(raw) - len(lines[-1]))
            lines = lines[:-1]
        rows = [json.loads(line) for line in lines if line.strip()]
        if not rows or not isinstance(rows[0], dict) or HEADER_KEY not in rows[0]:
            raise ResultFileError(f"{self.path} exists but is not a remote VAS result file (no "
                                  f'"{HEADER_KEY}" header line): choose another output file')
        stored = rows[0][HEADER_KEY]
        if stored != self.settings:
            diff = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
            what = ", ".join(f"{k}: {stored.get(k)!r} there, {self.settings.get(k)!r} now" for k in diff)
            raise ResultFileError(
                f"{self.path} holds a run with other settings ({what}); resume with the same "
                "settings or write to another file")
        done: dict[int, dict[str, Any]] = {}
        for row in rows[1:]:
            i = row.get("index")
            if not isinstance(i, int) or not 0 <= i < len(prompts):
                raise ResultFileError(f"{self.path}: record index {i!r} is not a prompt index of "
                                      f"this run ({len(prompts)} prompts)")
            if row.get("prompt") != prompts[i]:
                raise ResultFileError(f"{self.path}: prompt {i} there is {row.get('prompt')!r}, "
                                      f"now {prompts[i]!r}: the prompts changed")
            done[i] = row
        return done

    def start(self) -> None:
        """Write the header if the file is new."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({HEADER_KEY: self.settings})

    def write(self, record: dict[str, Any]) -> None:
        self._append(record)

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False
