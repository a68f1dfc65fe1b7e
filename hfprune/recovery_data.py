"""Recovery data: examples (input ids + labels), rows (examples packed side by side), collated batches and the
seeded stream of micro-batches (hfprune.recovery says which recipe uses what).

Data (`recovery.data`):
- ``calibration`` (offline default): a SMOKE recovery, not the paper's. Plain next-token training on
  non-overlapping windows of the ``recovery`` text source, i.e. calibration documents held out from the
  text the criteria score with (hfprune.data.RECOVERY_DOCS), so recovery never trains on scored text.
- ``lamini`` (the paper's): MBZUAI/LaMini-instruction (its `instruction` / `response` columns) from the hub, or
  from its copy under ``hub_datasets_dir`` ($HFPRUNE_HUB_DATASETS), in an Alpaca-style prompt, with the loss on
  the response tokens only.
Both give examples as (input_ids, labels) lists; labels are -100 where no loss is taken.
"""

from __future__ import annotations

import torch

from hfprune.data import hub_path, load_dataset, load_texts, texts_hash
from hfprune.errors import ConfigError
from hfprune.models import additive_mask
from hfprune.windows import contiguous_chunks

IGNORE = -100  # label of a position that takes no loss (prompt, padding)
LAMINI = "MBZUAI/LaMini-instruction"
# The Alpaca prompt without an input field (LaMini rows have only an instruction and a response).
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

Example = tuple[list[int], list[int]]
Row = list[Example]  # examples side by side in one training row


def calibration_examples(tokenizer, seq_len: int, num_samples: int | None) -> tuple[list[Example], dict]:
    """Non-overlapping `seq_len` windows of the held-out calibration text, loss on every next token."""
    texts = load_texts("recovery")
    max_tokens = None if num_samples is None else num_samples * seq_len
    chunks = contiguous_chunks(tokenizer, texts, seq_len, max_tokens)
    if num_samples is not None and len(chunks) < num_samples:
        raise ConfigError(f"recovery.num_samples: {num_samples} windows of {seq_len} tokens requested, the held-out "
                          f"calibration text has {len(chunks)}; lower recovery.num_samples or recovery.seq_len")
    examples = [(row, list(row)) for row in chunks.tolist()]
    meta = {"source": "recovery (held-out calibration documents)", "documents": len(texts),
            "texts_sha256": texts_hash(texts), "examples": len(examples),
            "label_tokens": len(examples) * (seq_len - 1)}  # every position but the first is predicted
    return examples, meta


def alpaca_examples(tokenizer, instructions, responses, seq_len: int,
                    keep_prompt_only: bool = False) -> tuple[list[Example], int]:
    """Alpaca-prompted (prompt + response + EOS) examples, truncated to `seq_len`, loss on the response only.

    Prompt and response are tokenized separately, so the prompt/response boundary (and hence the mask) is exact.
    An example whose prompt alone fills `seq_len` carries no loss: dropped, or kept truncated with
    `keep_prompt_only` (the released recipe truncates every example and drops none). Returns (examples, number of
    such prompt-only examples).
    """
    prompts = [ALPACA_PROMPT.format(instruction=i.strip()) for i in instructions]
    prompt_ids = tokenizer(prompts)["input_ids"]  # the tokenizer's own special tokens (BOS where it adds one)
    response_ids = tokenizer([r.strip() for r in responses], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, prompt_only = [], 0
    for p, r in zip(prompt_ids, response_ids):
        prompt_only += len(p) >= seq_len
        if len(p) >= seq_len and not keep_prompt_only:
            continue
        ids = (p + r + eos)[:seq_len]
        examples.append((ids, ([IGNORE] * len(p) + r + eos)[:seq_len]))
    return examples, prompt_only


def lamini_examples(tokenizer, seq_len: int, num_samples: int | None, seed: int,
                    keep_prompt_only: bool, hub_dir: str | None = None) -> tuple[list[Example], dict]:
    """The paper's recovery data: a seeded subset (all rows if `num_samples` is null) of LaMini-instruction, from
    the hub or its copy under `hub_dir` (hfprune.data.hub_path)."""
    path = hub_path(LAMINI, hub_dir)
    ds = load_dataset(path, split="train")
    if num_samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(num_samples, len(ds))))
    examples, prompt_only = alpaca_examples(tokenizer, ds["instruction"], ds["response"], seq_len, keep_prompt_only)
    if prompt_only == len(ds):
        raise ConfigError(f"recovery.seq_len {seq_len} is shorter than every Alpaca prompt; raise it")
    meta = {"source": LAMINI, "path": path, "rows": len(ds), "examples": len(examples),
            ("kept_prompt_only" if keep_prompt_only else "dropped_prompt_too_long"): prompt_only,
            "label_tokens": sum(sum(t != IGNORE for t in lab[1:]) for _, lab in examples)}
    return examples, meta


def recovery_examples(tokenizer, rcfg: dict, seed: int, hub_dir: str | None = None) -> tuple[list[Example], dict]:
    if rcfg["data"] == "lamini":
        return lamini_examples(tokenizer, rcfg["seq_len"], rcfg["num_samples"], seed,
                               keep_prompt_only=rcfg["recipe"] == "released", hub_dir=hub_dir)
    return calibration_examples(tokenizer, rcfg["seq_len"], rcfg["num_samples"])


def pack(examples: list[Example], seq_len: int) -> list[Row]:
    """Greedy packing in order: an example joins the current row while the row stays within `seq_len` tokens,
    else it starts the next (the released pack_data_points_by_length, no limit on examples per row)."""
    rows: list[Row] = []
    used = seq_len  # forces a new row for the first example
    for ex in examples:
        if used + len(ex[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex[0])
    return rows


def training_rows(examples: list[Example], rcfg: dict, seed: int) -> list[Row]:
    """compact: one example per row. released: the examples, in a seeded order (the released code shuffles the
    dataset once before packing), packed into `seq_len`-token rows."""
    if rcfg["recipe"] != "released":
        return [[ex] for ex in examples]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return pack([examples[i] for i in order], rcfg["seq_len"])


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of examples side by side, right-padded to the longest row -> input_ids, labels, position_ids
    (restarting at 0 in every example) and segments (the example's index in its row, -1 on padding).

    The first label of every example is dropped: in a packed row it would be predicted from the previous example
    (the released pack_data_points_FA does the same). Padding takes no loss.
    """
    length = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, (ids, lab) in enumerate(row):
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start + 1:end] = torch.tensor(lab[1:], dtype=torch.long)
            segments[r, start:end] = k
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(length - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segments": segments}


def attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: a token attends to itself and the earlier tokens of its own example (padding
    to earlier padding, so no query row is fully masked)."""
    idx = torch.arange(segments.shape[1], device=segments.device)
    allowed = (idx[None, None, :] <= idx[None, :, None]) & (segments[:, None, :] == segments[:, :, None])
    return additive_mask(allowed, dtype)


def micro_batches(num_rows: int, batch_size: int, seed: int):
    """Endless seeded stream of row-index batches: a fresh permutation per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_rows, generator=gen).tolist()
        for start in range(0, num_rows, batch_size):
            yield order[start:start + batch_size]

