"""Text sources and windows: calibration sampling (`stream`, `per_document`, `wanda`), the perplexity protocols
(`stream`, `wanda`) against the reference code re-implemented here, hub-format copies, and your own text files."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hfprune.data import (
    HUB_DIR_ENV,
    content_digest,
    hub_datasets_dir,
    load_rows,
    load_texts,
    text_source,
    texts_hash,
)
from hfprune.errors import ConfigError, HFPruneError
from hfprune.evaluation.perplexity import source_perplexity
from hfprune.evaluation.records import read_records, records_path
from hfprune.windows import eval_chunks, sample_windows


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


# ---- hub-format copies (tests/fixtures/hub, made by tests/fixtures/make_hub_fixtures.py) and the published protocols

HUB = str(Path(__file__).resolve().parent / "fixtures" / "hub")
C4_VAL = {"validation": "en/c4-validation.00000-of-00008.json.gz"}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """load_dataset caches under tmp: fixture copies never enter the user's datasets cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def wanda_eval_ppl(model, testenc, seqlen):
    """locuslab/wanda lib/eval.py eval_ppl_wikitext, batch size 1, written out again for the test."""
    nsamples = testenc.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            inputs = testenc[:, i * seqlen:(i + 1) * seqlen]
            lm_logits = model(inputs).logits
            loss = torch.nn.CrossEntropyLoss()(lm_logits[0, :-1].float(), inputs[0, 1:])
            nlls.append(loss * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item(), nsamples


def test_hub_names_read_the_hub_files_through_load_dataset(monkeypatch):
    import datasets

    assert text_source("wikitext2").hf == "wikitext" and text_source("c4").hf == "allenai/c4"  # no copy: the hub
    assert text_source("c4", "calibration").data_files == (("train", ("en/c4-train.00000-of-01024.json.gz",)),)
    monkeypatch.setenv(HUB_DIR_ENV, HUB)  # the same calls on a local copy in the hub's layout
    wiki = text_source("wikitext2", "eval", hub_datasets_dir())
    assert wiki.hf == f"{HUB}/wikitext" and wiki.split == "test"
    want = datasets.load_dataset(f"{HUB}/wikitext", "wikitext-2-raw-v1", split="test")["text"]
    assert load_rows(wiki) == tuple(want) and "" in want  # every row, empty ones included
    assert load_texts(wiki) == tuple(t for t in want if t.strip())
    assert text_source("wikitext2", "calibration", HUB).split == "train"
    c4 = load_rows(text_source("c4", "eval", HUB))
    assert c4 == tuple(datasets.load_dataset(f"{HUB}/allenai/c4", data_files=C4_VAL, split="validation")["text"])


def test_wanda_wikitext2_perplexity_matches_the_reference_loop(tiny, tok):
    import datasets

    got = source_perplexity(tiny, tok, text_source("wikitext2", "eval", HUB), seq_len=64, max_tokens=None,
                            protocol="wanda")
    testdata = datasets.load_dataset(f"{HUB}/wikitext", "wikitext-2-raw-v1", split="test")
    testenc = tok("\n\n".join(testdata["text"]), return_tensors="pt").input_ids
    ppl, nsamples = wanda_eval_ppl(tiny, testenc, 64)
    assert got["protocol"] == "wanda" and got["windows"] == nsamples and got["seq_len"] == 64
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert got["texts_sha256"] == texts_hash(testdata["text"])
    stream = source_perplexity(tiny, tok, text_source("wikitext2", "eval", HUB), 64, None, protocol="stream")
    assert stream["protocol"] == "stream" and stream["ppl"] != got["ppl"]  # the protocols cut other windows


def test_wanda_c4_perplexity_matches_the_reference(tiny, tok):
    import datasets

    got = source_perplexity(tiny, tok, text_source("c4", "eval", HUB), seq_len=8, max_tokens=None, protocol="wanda")
    valdata = datasets.load_dataset(f"{HUB}/allenai/c4", data_files=C4_VAL, split="validation")
    valenc = tok(" ".join(valdata[:1100]["text"]), return_tensors="pt").input_ids[:, :(256 * 8)]
    ppl, nsamples = wanda_eval_ppl(tiny, valenc, 8)
    assert nsamples == 256 == got["windows"]  # the fixture has more than 256 x 8 tokens: the cap is what counts
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)


def test_wanda_c4_joins_only_the_first_1100_documents(tmp_path, tok):
    import gzip

    folder = tmp_path / "allenai" / "c4" / "en"
    folder.mkdir(parents=True)
    docs = [f"Document {i} says hello." for i in range(1200)]
    with gzip.open(folder / "c4-validation.00000-of-00008.json.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": d, "timestamp": "", "url": ""}) + "\n" for d in docs)
    chunks, starts, texts = eval_chunks(tok, text_source("c4", "eval", str(tmp_path)), 64, None, "wanda")
    want = tok(" ".join(docs[:1100]))["input_ids"]
    assert len(want) < 256 * 64 and chunks.flatten().tolist() == want[:len(want) // 64 * 64]
    assert len(texts) == 1100 and max(starts) < 1100 and starts == sorted(starts)
    for row, d in zip(chunks.tolist(), starts):  # each window starts inside the document it is said to
        assert tok.decode(row[:1]).strip() in docs[d]


def test_wanda_c4_calibration_draws_as_the_reference(tok):
    import random

    texts = load_texts(text_source("c4", "calibration", HUB))
    calls = []

    class Counting:  # the real tokenizer, counting the documents it is given
        def __call__(self, text, **kwargs):
            calls.append(text)
            return tok(text, **kwargs)

    windows, docs = sample_windows(Counting(), texts, 10, 64, seed=5, return_docs=True, sampling="wanda")
    random.seed(5)  # locuslab/wanda lib/data.py get_c4, written out again
    want, drawn = [], []
    for _ in range(10):
        while True:
            i = random.randint(0, len(texts) - 1)
            drawn.append(i)
            enc = tok(texts[i], return_tensors="pt")
            if enc.input_ids.shape[1] > 64:
                break
        j = random.randint(0, enc.input_ids.shape[1] - 64 - 1)
        want.append(enc.input_ids[:, j:j + 64])
    assert torch.equal(windows, torch.cat(want))
    assert len(calls) == len(set(drawn)) < len(texts)  # only drawn documents are tokenized, each once
    assert any(len(tok(texts[d])["input_ids"]) <= 64 for d in drawn)  # the fixture makes it skip short ones
    for w, d in zip(windows.tolist(), docs):
        ids = tok(texts[d])["input_ids"]
        assert any(ids[i:i + 64] == w for i in range(len(ids) - 64))  # inside one document
    assert torch.equal(windows, sample_windows(tok, texts, 10, 64, seed=5, sampling="wanda"))
    assert not torch.equal(windows, sample_windows(tok, texts, 10, 64, seed=6, sampling="wanda"))


def test_wanda_sampling_stops_when_no_document_is_long_enough(tok):
    with pytest.raises(HFPruneError, match=r"^calibration.sampling wanda: none of the 3 documents is longer"):
        sample_windows(tok, ("a b", "c d", "e f"), 2, 64, 0, sampling="wanda")


def test_lamini_from_its_hub_format_copy(tok):
    import pyarrow.parquet as pq

    from hfprune.recovery_data import ALPACA_PROMPT, lamini_examples

    examples, meta = lamini_examples(tok, seq_len=256, num_samples=12, seed=0, keep_prompt_only=True, hub_dir=HUB)
    assert meta["path"] == f"{HUB}/MBZUAI/LaMini-instruction" and meta["rows"] == 12 == len(examples)
    table = pq.read_table(f"{HUB}/MBZUAI/LaMini-instruction/data/train-00000-of-00001.parquet").to_pylist()
    for ids, labels in examples:
        text = tok.decode(ids)
        row = next(r for r in table if ALPACA_PROMPT.format(instruction=r["instruction"].strip()) in text)
        assert tok.decode([t for t in labels if t != -100]).startswith(row["response"].strip())


# ---- your own text: files and load_dataset calls in the config

def _write(path, text, mode="w"):
    path.write_text(text, encoding="utf-8") if mode == "w" else path.write_bytes(text)
    return str(path)


def test_own_text_files_in_every_format(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["First document,\nover two lines.", "Second one.", "Third."]
    txt = _write(tmp_path / "a.txt", "\n\n".join(docs) + "\n\n  \n")
    jsonl = _write(tmp_path / "a.jsonl", "".join(json.dumps({"body": d, "n": 1}) + "\n\n" for d in docs))
    js = _write(tmp_path / "a.json", json.dumps([{"body": d} for d in docs]))
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps({"body": d}) + "\n" for d in docs).encode()))
    pq.write_table(pa.table({"body": docs + [""]}), tmp_path / "a.parquet")
    for value in ({"path": txt}, {"path": jsonl, "field": "body"}, {"path": js, "field": "body"},
                  {"path": str(gz), "field": "body"}, {"path": str(tmp_path / "a.parquet"), "field": "body"},
                  {"hf": "json", "data_files": jsonl, "field": "body"}):
        assert load_texts(text_source(value)) == tuple(docs), value
    assert text_source({"path": txt}).label == "a.txt" and text_source({"path": txt, "name": "mine"}).label == "mine"
    assert text_source({"hf": "json", "data_files": [jsonl]}) == text_source({"hf": "json", "data_files": [jsonl]})


def _cfg(**sections):
    return {"models": [{"name": "m", "family": "llama", "source": "smollm2-135m"}], "criteria": ["random"],
            "ratios": [0.2], "resources_dir": "/nonexistent", **sections}


@pytest.mark.parametrize("content, value, message", [
    (None, {"field": "text"}, r"text file '.*missing.jsonl' does not exist"),
    ('{"text": "a"}\n{"text": "b"\n', {"field": "text"}, r"text file '.*a.jsonl' line 2: bad JSON"),
    ('{"text": "a"}\n{"body": "b"}\n', {"field": "text"}, r"text file '.*a.jsonl' line 2: no field 'text' \(fields: body\)"),
    ('{"text": 3}\n', {"field": "text"}, r"text file '.*a.jsonl' line 1: field 'text' is int, not text"),
    ('{"text": " "}\n', {"field": "text"}, r"text file '.*a.jsonl': no text in field 'text'"),
    (b"\xff\xfe\x00", {"field": "text"}, r"text file '.*a.jsonl': not UTF-8 text"),
    ('{"text": "a"}\n', {}, r"text file '.*a.jsonl': name the field that holds the text"),
])
def test_bad_own_text_is_one_line_at_validation(tmp_path, content, value, message):
    from hfprune.validation import validate_config

    path = tmp_path / ("missing.jsonl" if content is None else "a.jsonl")
    if content is not None:
        _write(path, content, "w" if isinstance(content, str) else "b")
    for field, cfg in (("calibration.source", _cfg(calibration={"source": {"path": str(path), **value}})),
                       ("evaluation.perplexity.sources[1]",
                        _cfg(evaluation={"suite": "none", "perplexity": {"sources": ["wiki", {"path": str(path), **value}]}})),
                       ("evaluation.fidelity.source",
                        _cfg(evaluation={"suite": "none", "fidelity": {"source": {"path": str(path), **value}}}))):
        with pytest.raises(ConfigError, match=f"invalid config field '{re.escape(field)}': {message}") as err:
            validate_config(cfg)
        assert "\n" not in str(err.value)


def test_own_text_labels_must_differ_and_txt_has_no_field(tmp_path):
    from hfprune.validation import validate_config

    txt = _write(tmp_path / "a.txt", "some text")
    with pytest.raises(ConfigError, match=r"'evaluation.perplexity.sources\[1\]': label 'a.txt' is also"):
        validate_config(_cfg(evaluation={"suite": "none", "perplexity": {"sources": [{"path": txt}, {"path": txt}]}}))
    with pytest.raises(ConfigError, match=r"'calibration.source': text file .* a .txt file has no fields"):
        validate_config(_cfg(calibration={"source": {"path": txt, "field": "text"}}))
    with pytest.raises(ConfigError, match=r"'hub_datasets_dir': '/no/such' is not a folder"):
        validate_config(_cfg(hub_datasets_dir="/no/such"))


@pytest.mark.parametrize("section, field, message", [
    ("calibration", "calibration.source", r"text too short: \d+ tokens available, 64 per sequence"),
    ("perplexity", r"evaluation.perplexity.sources\[0\]", r"held-out text too short: \d+ tokens for sequences of 256"),
    ("fidelity", "evaluation.fidelity.source", r"text too short: \d+ tokens available, 64 per sequence"),
])
def test_own_text_too_short_for_its_windows_fails_where_the_grid_starts(tmp_path, section, field, message):
    from conftest import REPO_RESOURCES

    from hfprune.validation import check_models, validate_config

    short = {"path": _write(tmp_path / "short.txt", "Only a few words here.")}
    ev = {"suite": "none", "perplexity": {"sources": [short] if section == "perplexity" else ["wiki"]},
          "fidelity": {"source": short if section == "fidelity" else "lambada"}}
    cfg = validate_config({**_cfg(evaluation=ev, calibration={"seq_len": 64}), "resources_dir": REPO_RESOURCES,
                           **({"calibration": {"source": short, "seq_len": 64}} if section == "calibration" else {})})
    with pytest.raises(ConfigError, match=f"invalid config field '{field}' for model 'm': text source 'short.txt': "
                                          f"{message}") as err:
        check_models(cfg)
    assert "\n" not in str(err.value)


def test_settings_digest_sees_the_file_content(tmp_path):
    path = tmp_path / "a.jsonl"
    _write(path, '{"text": "one"}\n')
    section = {"source": {"path": str(path), "field": "text"}, "seq_len": 8}
    before = content_digest(section)
    _write(path, '{"text": "two"}\n')
    os.utime(path, ns=(1, 1))  # a new mtime (the hash is cached on path, size and mtime)
    assert len(before) == 1 and content_digest(section) != before
    assert content_digest({"source": "calibration", "sources": ["wiki"]}) == []


def test_settings_digest_sees_files_in_a_local_dataset_folder_and_glob_data_files(tmp_path):
    """`{hf: <local folder>}` may read any file in it, and data_files may be glob patterns: an edit to any file
    either names changes the digest; a hidden folder (.git, caches) is not read."""
    folder = tmp_path / "ds"
    for sub in ("data", ".git"):
        (folder / sub).mkdir(parents=True)
    _write(folder / "data" / "train-0.jsonl", '{"text": "one"}\n')
    _write(folder / "data" / "train-1.jsonl", '{"text": "two"}\n')
    _write(folder / ".git" / "HEAD", "ref: a\n")
    by_folder = {"source": {"hf": str(folder), "field": "text"}}
    by_glob = {"source": {"hf": "json", "data_files": str(folder / "data" / "train-*.jsonl"), "field": "text"}}
    before = [content_digest(by_folder), content_digest(by_glob)]
    assert [len(d) for d in before] == [2, 2]
    _write(folder / ".git" / "HEAD", "ref: b\n")
    assert [content_digest(by_folder), content_digest(by_glob)] == before
    _write(folder / "data" / "train-1.jsonl", '{"text": "three"}\n')
    os.utime(folder / "data" / "train-1.jsonl", ns=(1, 1))
    after = [content_digest(by_folder), content_digest(by_glob)]
    assert [a[0] == b[0] and a[1] != b[1] for a, b in zip(after, before)] == [True, True]


def test_evaluation_with_own_text_and_wanda_protocol(tiny_llama_dir, tmp_path):
    from hfprune.evaluation import run_evaluation
    from hfprune.validation import validate_config

    docs = load_texts("wiki")[:6]
    path = _write(tmp_path / "mine.jsonl", "".join(json.dumps({"t": d}) + "\n" for d in docs))
    cfg = validate_config({
        "models": [{"name": "tiny", "family": "llama", "source": str(tiny_llama_dir)}], "criteria": ["random"],
        "ratios": [0.2], "device": "cpu", "hub_datasets_dir": HUB,
        "evaluation": {"suite": "none", "efficiency": {"enabled": False},
                       "perplexity": {"sources": [{"path": path, "field": "t"}, "wikitext2"], "seq_len": 32,
                                      "max_tokens": None, "protocol": "wanda"}}})
    out = run_evaluation(cfg, "tiny", out_path=tmp_path / "m.json")
    mine = out["perplexity"]["mine.jsonl"]
    assert mine["protocol"] == "wanda" == out["perplexity"]["wikitext2"]["protocol"]
    assert mine["texts_sha256"] == texts_hash(docs)
    joined = AutoTokenizer.from_pretrained(tiny_llama_dir)("\n\n".join(docs))["input_ids"]
    assert mine["windows"] == len(joined) // 32 > 0
    units = read_records(records_path(tmp_path / "m.json"))
    assert set(units["group"]) == {"mine.jsonl", "wikitext2"}
