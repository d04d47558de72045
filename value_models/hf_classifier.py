"""`hf:PATH_OR_HUB_ID[:options]`: a Hugging Face sequence-classification model as a reward,
scored in batches on the GPU (or the CPU).

Options (trailing `:key=value` parts of the spec):
    label=N|NAME    the class to score (default: 0 for a one-logit model, else 1)
    output=prob|logit   softmax probability of `label` (sigmoid for one logit), or its raw logit
    on=full|response|pair   the text scored: prompt + response (default), the response alone, or
                    the (prompt, response) pair encoded as two segments, as reward models
                    trained on question/answer pairs expect (OpenAssistant's DeBERTa:
                    `hf:OpenAssistant/reward-model-deberta-v3-large-v2:output=logit:on=pair`)
    batch_size=32   texts per forward; max_length=512 tokens per text (truncated beyond)
    device=auto|cpu|cuda   auto: the GPU when torch sees one
    dtype=auto|float32|bfloat16|float16   auto: bfloat16 on a GPU, float32 on the CPU
A call sorts its texts by length before batching (less padding) and returns the scores in the
caller's order. `stats()` reports texts, tokens, seconds and the peak GPU memory so far.
"""
from __future__ import annotations

import time
from typing import Any, Literal

Side = Literal["full", "response", "pair"]


class HFClassifierReward:
    """A Hugging Face sequence-classification model (local folder or hub id) as a reward."""

    def __init__(self, name: str, path: str, *, label: int | str | None = None,
                 output: Literal["prob", "logit"] = "prob", batch_size: int = 32,
                 max_length: int = 512, on: Side = "full", device: str = "auto",
                 dtype: str = "auto") -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from value_models.checkpoint import resolve_model_path, torch_dtype

        if on not in ("full", "response", "pair"):
            raise ValueError(f"reward {name}: on must be 'full', 'response' or 'pair', found {on!r}")
        if output not in ("prob", "logit"):
            raise ValueError(f"reward {name}: output must be 'prob' or 'logit', found {output!r}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"reward {name}: device must be auto, cpu or cuda, found {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"reward {name}: device cuda, but torch sees no CUDA GPU")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"reward {name}: expected batch_size >= 1 and max_length >= 2, found "
                             f"{batch_size} and {max_length}")
        self.name, self.on = name, on
        self.device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        target = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if dtype == "auto" \
            else torch_dtype(dtype)
        folder = resolve_model_path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=target).to(self.device).eval()
        n = int(self.model.config.num_labels)
        if label is None:
            label = 0 if n == 1 else 1
        if isinstance(label, str):
            names = {str(v): int(k) for k, v in (self.model.config.id2label or {}).items()}
            if label not in names:
                raise ValueError(f"reward {name}: label {label!r} not among {sorted(names)}")
            label = names[label]
        if not 0 <= label < n:
            raise ValueError(f"reward {name}: label must be in 0..{n - 1} ({path} has {n} "
                             f"labels), found {label}")
        # right padding: classifiers pool at the last real token (or the first, [CLS]), and a
        # decoder's positions would shift under left padding
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:  # e.g. GPT-2 style tokenizers: pad with eos
            self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label, self.output, self.batch_size, self.max_length = label, output, batch_size, max_length
        self._texts = self._tokens = 0
        self._seconds = 0.0

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{self.name}: got {len(prompts)} prompts, {len(responses)} responses")
        if self.on == "pair":
            items: list[tuple[str, ...]] = [(p, r) for p, r in zip(prompts, responses)]
        elif self.on == "response":
            items = [(r,) for r in responses]
        else:
            items = [(p + r,) for p, r in zip(prompts, responses)]
        return self.score_items(items)

    def score_texts(self, texts: list[str]) -> list[float]:
        return self.score_items([(t,) for t in texts])

    def score_items(self, items: list[tuple[str, ...]]) -> list[float]:
        """Scores of texts (1-tuples) or pairs, batched by length, in the given order."""
        import torch

        t0 = time.perf_counter()
        order = sorted(range(len(items)), key=lambda i: sum(len(x) for x in items[i]))
        out = [0.0] * len(items)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            cols = list(zip(*(items[i] for i in idx)))                   # 1 or 2 lists of [B]
            enc = self.tokenizer(*cols, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()                # [B, C]
            if self.output == "logit":
                col = logits[:, self.label]
            elif logits.shape[1] == 1:
                col = torch.sigmoid(logits[:, 0])
            else:
                col = torch.softmax(logits, dim=-1)[:, self.label]
            for i, v in zip(idx, col.tolist()):
                out[i] = v
            self._tokens += int(enc["attention_mask"].sum())
        self._texts += len(items)
        self._seconds += time.perf_counter() - t0
        return out

    def stats(self) -> dict[str, Any]:
        """Throughput and memory so far: texts, tokens, seconds, texts/s, peak GPU memory."""
        import torch

        s = {"texts": self._texts, "tokens": self._tokens, "seconds": round(self._seconds, 3),
             "texts_per_s": self._texts / self._seconds if self._seconds else None,
             "device": str(self.device)}
        if self.device.type == "cuda":
            s["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return s
