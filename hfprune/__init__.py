"""hfprune: a reproducible experiment grid for structured pruning of LLaMA/Qwen-family language models."""

import os

__version__ = "0.1.0"

# The project never reaches a model hub unless a config asks for a hub source explicitly
# (hfprune.models turns these off again for hub sources). A HF_HUB_OFFLINE=1 of the user's own (after
# `hfprune prefetch`) is kept: the marker tells this default apart, also in the jobs, which inherit both.
if "HF_HUB_OFFLINE" not in os.environ:
    os.environ["HFPRUNE_OFFLINE_DEFAULT"] = "1"
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
