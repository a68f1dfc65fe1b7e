"""Token windows built from the texts of hfprune.data: the EOS-joined document stream, seeded calibration windows
(``stream``, ``per_document``, ``wanda`` sampling) and held-out perplexity windows (``stream``, ``wanda`` protocols)."""

from __future__ import annotations

import bisect
import random

from hfprune.data import load_rows, load_texts, text_source
from hfprune.errors import HFPruneError


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


SAMPLINGS = ("stream", "per_document", "wanda")


def sample_windows(tokenizer, texts, num_sequences: int, seq_len: int, seed: int, return_docs: bool = False,
                   sampling: str = "stream"):
    """`num_sequences` seeded calibration windows of `seq_len` tokens.

    - ``stream``: random offsets of the EOS-joined stream of all documents (a window may span documents);
      a BOS token is put first where the tokenizer adds one, so a window looks like an ordinary input.
    - ``per_document`` (the released HFPrune/SDMPrune code): documents in seeded random order, those longer
      than `seq_len` tokens kept, ONE random window inside each, from the first `num_sequences` of them;
      windows never cross documents and no BOS is put first (documents are tokenized as the released code
      does, with the tokenizer's default special tokens).
    - ``wanda`` (Wanda/SparseGPT `get_c4`): for each window, documents drawn at random with replacement by
      Python's `random` seeded with `seed` until one is longer than `seq_len` tokens, then one random window
      inside it; only the drawn documents are tokenized (default special tokens).
    Returns a LongTensor [num_sequences, seq_len] (and, with return_docs, the document each window starts in).
    """
    import torch

    if sampling == "per_document":
        return _per_document_windows(tokenizer, texts, num_sequences, seq_len, seed, return_docs)
    if sampling == "wanda":
        return _wanda_windows(tokenizer, texts, num_sequences, seq_len, seed, return_docs)
    if sampling != "stream":
        raise HFPruneError(f"calibration.sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
    bos = bos_prefix(tokenizer)
    body = seq_len - len(bos)
    stream, doc_starts = stream_with_starts(tokenizer, texts)
    if body <= 0 or len(stream) < body:
        raise HFPruneError(
            f"text too short: {len(stream)} tokens available, {seq_len} per sequence requested "
            "(lower the seq_len or choose a larger text source)")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - body + 1, (num_sequences,), generator=gen).tolist()
    windows = torch.tensor([bos + stream[s:s + body] for s in starts], dtype=torch.long)
    return (windows, document_at(doc_starts, starts)) if return_docs else windows


# documents tokenized per step while looking for long ones (C4 has ~356k per file: never tokenize them all)
_DOC_BATCH = 256


def _per_document_windows(tokenizer, texts, num_sequences: int, seq_len: int, seed: int, return_docs: bool):
    import torch

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


def _wanda_windows(tokenizer, texts, num_sequences: int, seq_len: int, seed: int, return_docs: bool):
    # lib/data.py get_c4 of locuslab/wanda, draw for draw: random.seed(seed); per sample, randint(0, len - 1) until
    # a document has more than seqlen tokens, then randint(0, tokens - seqlen - 1) as the window's start
    import torch

    rng = random.Random(seed)
    lengths: dict[int, list[int]] = {}  # documents tokenized so far (a redrawn one is not tokenized again)
    windows: list[list[int]] = []
    docs: list[int] = []
    while len(windows) < num_sequences:
        d = rng.randint(0, len(texts) - 1)
        if d not in lengths:
            lengths[d] = tokenizer(texts[d])["input_ids"]
        ids = lengths[d]
        if len(ids) > seq_len:
            i = rng.randint(0, len(ids) - seq_len - 1)
            windows.append(ids[i:i + seq_len])
            docs.append(d)
        elif len(lengths) == len(texts) and all(len(v) <= seq_len for v in lengths.values()):
            raise HFPruneError(f"calibration.sampling wanda: none of the {len(texts)} documents is longer than "
                               f"seq_len {seq_len} tokens (lower calibration.seq_len or use sampling: stream)")
    out = torch.tensor(windows, dtype=torch.long)
    return (out, docs) if return_docs else out


def contiguous_chunks(tokenizer, texts, seq_len: int, max_tokens: int | None, return_docs: bool = False):
    """Non-overlapping chunks of the document stream, in order (held-out evaluation text); with return_docs
    also the document each chunk starts in."""
    import torch

    stream, doc_starts = stream_with_starts(tokenizer, texts)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = len(stream) // seq_len
    if n == 0:
        raise HFPruneError(f"held-out text too short: {len(stream)} tokens for sequences of {seq_len}")
    chunks = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return (chunks, document_at(doc_starts, range(0, n * seq_len, seq_len))) if return_docs else chunks


PROTOCOLS = ("stream", "wanda")
# Wanda/SparseGPT (locuslab/wanda lib/data.py): how rows are joined before the one tokenization, how many leading
# rows are joined and how many windows are kept; C4 has its own, every other text is treated as WikiText-2.
WANDA = {"c4": (" ", 1100, 256)}
WANDA_DEFAULT = ("\n\n", None, None)


def eval_chunks(tokenizer, source, seq_len: int, max_tokens: int | None, protocol: str = "stream"):
    """Held-out perplexity windows of a text source: (chunks [n, seq_len], the document each starts in, the
    texts read (hashed into the metrics)).

    - ``stream`` (ours): documents tokenized without special tokens, joined by EOS, the first `max_tokens` cut
      into non-overlapping windows (hfprune.windows.contiguous_chunks).
    - ``wanda`` (Wanda, SparseGPT, LLM-Pruner tables; locuslab/wanda lib/data.py + lib/eval.py eval_ppl_wikitext):
      every row of the text (empty ones included; WikiText-2: the test split) joined with "\n\n" and tokenized
      ONCE with the tokenizer's special tokens, cut into numel // seq_len non-overlapping windows, the rest dropped;
      C4 (`c4`, its first validation shard): the first 1100 rows joined with " ", the first 256 x seq_len tokens.
      `max_tokens` (null for the published numbers) caps the tokens further.
    """
    import torch

    source = text_source(source)
    if protocol == "stream":
        texts = load_texts(source)
        try:
            chunks, docs = contiguous_chunks(tokenizer, texts, seq_len, max_tokens, return_docs=True)
        except HFPruneError as exc:
            raise HFPruneError(f"text source {source.label!r}: {exc}") from None
        return chunks, docs, texts
    if protocol != "wanda":
        raise HFPruneError(f"evaluation.perplexity.protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    sep, n_rows, n_windows = WANDA.get(source.name, WANDA_DEFAULT)
    rows = load_rows(source)[:n_rows]
    joined = sep.join(rows)
    fast = getattr(tokenizer, "is_fast", False)  # only fast tokenizers give character offsets
    enc = tokenizer(joined, return_offsets_mapping=fast)
    ids = enc["input_ids"]
    limits = [n for n in (None if n_windows is None else n_windows * seq_len, max_tokens) if n is not None]
    ids = ids[:min(limits)] if limits else ids
    n = len(ids) // seq_len
    if n == 0:
        raise HFPruneError(f"text source {source.label!r} too short: {len(ids)} tokens for windows of {seq_len}")
    row_starts, pos = [], 0
    for row in rows:
        row_starts.append(pos)
        pos += len(row) + len(sep)
    # the row each window's first token comes from (its character offset in the joined text); without offsets
    # every window is its own cluster
    docs = document_at(row_starts, [enc["offset_mapping"][i * seq_len][0] for i in range(n)]) if fast \
        else list(range(n))
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len), docs, rows
