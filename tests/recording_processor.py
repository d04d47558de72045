"""A VASProcessor that records, at every step, the token history it scores for each VAS row:
one JSON line {"row": id, "prompt": [...], "output": [...]} per row and step, appended to the
file named by $VAS_RECORD_FILE. For tests/test_chat_sampling.py, which serves it with
`--logits-processors recording_processor:RecordingVASProcessor` (tests/ on PYTHONPATH)."""
from __future__ import annotations

import json
import os

import torch

from vas_vllm.processor_v1 import VASProcessor


class RecordingVASProcessor(VASProcessor):
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        lines = [json.dumps({"row": id(row), "prompt": list(row.prompt), "output": list(row.output)})
                 for _, row in self.rows.items()]
        if lines:
            with open(os.environ["VAS_RECORD_FILE"], "a") as fh:
                fh.write("".join(line + "\n" for line in lines))
        return super().apply(logits)
