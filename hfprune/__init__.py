"""hfprune: a reproducible experiment grid for structured pruning of LLaMA/Qwen-family language models."""

import os

__version__ = "0.1.0"

# The project never reaches a model hub unless a config asks for a hub source explicitly
# (hfprune.models turns these off again for hub sources).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
