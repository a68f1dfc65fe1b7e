"""Calibration windows: `stream` (EOS-joined documents) and `per_document` (the released HFPrune code)."""

import pytest
import torch
from transformers import AutoTokenizer

from hfprune.data import load_texts, sample_windows
from hfprune.errors import HFPruneError


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_per_document_windows_never_cross_documents(tok):
    texts = load_texts("calibration")[:200]
    windows, docs = sample_windows(tok, texts, 12, 128, seed=3, return_docs=True, sampling="per_document")
    assert windows.shape == (12, 128) and len(set(docs)) == 12
    for w, d in zip(windows.tolist(), docs):
        ids = tok(texts[d])["input_ids"]
        assert len(ids) > 128
        starts = [i for i in range(len(ids) - 128) if ids[i:i + 128] == w]  # inside the doc, never its last token
        assert starts
    again = sample_windows(tok, texts, 12, 128, seed=3, sampling="per_document")
    assert torch.equal(windows, again)
    assert not torch.equal(windows, sample_windows(tok, texts, 12, 128, seed=4, sampling="per_document"))


def test_stream_is_the_default_and_unchanged(tok):
    texts = load_texts("calibration")[:50]
    assert torch.equal(sample_windows(tok, texts, 4, 64, 0), sample_windows(tok, texts, 4, 64, 0, sampling="stream"))


def test_too_few_long_documents_is_one_clear_line(tok):
    texts = load_texts("calibration")[:100]
    with pytest.raises(HFPruneError, match=r"^calibration.sampling per_document: only \d+ of 100 documents are "
                                           r"longer than seq_len 1024 tokens, 5 needed") as err:
        sample_windows(tok, texts, 5, 1024, 0, sampling="per_document")
    assert "\n" not in str(err.value)
