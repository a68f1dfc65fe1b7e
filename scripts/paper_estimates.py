"""Write the cost estimate of config/paper.yaml into docs/GPU.md (between its `estimate` markers), here, without a hub.

`hfprune estimate --config config/paper.yaml` computes the same table where the models' config.json can be read
(cached or downloadable); this script supplies the published config.json facts of the paper's seven models
instead, and calls the same functions (hfprune.job_estimates).

    .venv/bin/python scripts/paper_estimates.py [--tflops X] [--out docs/GPU.md]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from hfprune import job_estimates
from hfprune.validation import load_config

ROOT = Path(__file__).resolve().parent.parent
# config.json facts of the hub checkpoints named in config/paper.yaml:
# (class, hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied embeddings)
PAPER_MODELS = {
    "llama-2-7b": (LlamaConfig, 4096, 11008, 32, 32, 32, 128, 32000, False),
    "llama-3.1-8b": (LlamaConfig, 4096, 14336, 32, 32, 8, 128, 128256, False),
    "llama-3.2-1b": (LlamaConfig, 2048, 8192, 16, 32, 8, 64, 128256, True),
    "llama-3.2-3b": (LlamaConfig, 3072, 8192, 28, 24, 8, 128, 128256, True),
    "qwen2.5-1.5b": (Qwen2Config, 1536, 8960, 28, 12, 2, 128, 151936, True),
    "qwen2.5-7b": (Qwen2Config, 3584, 18944, 28, 28, 4, 128, 152064, False),
    "qwen3-1.7b": (Qwen3Config, 2048, 6144, 28, 16, 8, 128, 151936, True),
}
BEGIN, END = "<!-- estimate:begin (scripts/paper_estimates.py) -->", "<!-- estimate:end -->"


def paper_archs() -> dict:
    return {name: cls(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hd, vocab_size=vocab, tie_word_embeddings=tied)
            for name, (cls, h, i, layers, heads, kv, hd, vocab, tied) in PAPER_MODELS.items()}


def render(cfg: dict, tflops: float | None) -> str:
    df = job_estimates.grid_table(cfg, paper_archs(), tflops)
    lines = [BEGIN, "", job_estimates.header(tflops), "", job_estimates.format_table(df, markdown=True), "",
             "Per stage, the whole grid:", "", job_estimates.format_totals(job_estimates.stage_totals(df), markdown=True), ""]
    lines += [f"- {note}" for note in job_estimates.notes(cfg, df, tflops)]
    return "\n".join(lines + ["", END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "paper.yaml"))
    parser.add_argument("--tflops", type=float)
    parser.add_argument("--out", default=str(ROOT / "docs" / "GPU.md"))
    args = parser.parse_args()
    cfg = load_config(args.config)
    missing = [m["name"] for m in cfg["models"] if m["name"] not in PAPER_MODELS]
    if missing:
        raise SystemExit(f"no config.json facts here for {', '.join(missing)}; use `hfprune estimate` instead")
    block = render(cfg, args.tflops)
    out = Path(args.out)
    text = out.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{out} has no {BEGIN} ... {END} markers")
    out.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL),
                   encoding="utf-8")
    print(block)


if __name__ == "__main__":
    main()
