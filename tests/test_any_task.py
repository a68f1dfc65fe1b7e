"""Any lm-eval task in `evaluation.tasks`: stock names, user task YAMLs from `evaluation.include_path` (data in a
local JSON file), groups reported by their own aggregation, and the one-line errors at validation."""

import json

import pytest
from conftest import REPO_RESOURCES

from hfprune.errors import ConfigError
from hfprune.evaluation import run_evaluation
from hfprune.evaluation.records import read_records, records_path
from hfprune.tasks import TaskSpec, resolve_suite
from hfprune.validation import validate_config

QUESTIONS = [("Is the sky blue on a clear day?", 1), ("Can a fish climb a tree?", 0), ("Is fire hot?", 1),
             ("Is ice warmer than boiling water?", 0), ("Do birds have feathers?", 1), ("Is the sun cold?", 0)]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: ["no", "yes"]
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""
GROUP = """group: {name}
task: {tasks}
aggregate_metric_list:
  - {{metric: acc, aggregation: mean, weight_by_size: true}}
"""
DATA = {"my_yesno": QUESTIONS, "my_yesno_b": QUESTIONS[::-1][:4], "my_yesno_c": QUESTIONS[:3]}


@pytest.fixture
def include_path(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")  # json cache under tmp
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, rows in DATA.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "label": y}) + "\n" for q, y in rows))
        (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=data))
    (folder / "my_group.yaml").write_text(GROUP.format(name="my_group", tasks="[my_yesno_b, my_yesno_c]"))
    (folder / "overlap.yaml").write_text(GROUP.format(name="overlap", tasks="[my_yesno]"))
    (folder / "no_agg.yaml").write_text("group: no_agg\ntask: [my_yesno]\n")
    return str(folder)


def _cfg(include_path, tasks, **ev):
    return validate_config({
        "models": [{"name": "smollm2-135m", "family": "llama", "source": "smollm2-135m"}], "criteria": ["random"],
        "ratios": [0.2], "resources_dir": REPO_RESOURCES, "device": "cpu",
        "evaluation": {"suite": "offline7", "tasks": tasks, "include_path": include_path, "limit": 4,
                       "perplexity": {"sources": []}, "fidelity": {"enabled": False},
                       "efficiency": {"enabled": False}, **ev}})


def test_user_tasks_and_group_end_to_end_on_smollm2(include_path, tmp_path):
    tasks = [{"task": "my_yesno", "metric": "acc_norm"}, "my_group", "arc_easy"]
    cfg = _cfg(include_path, tasks)
    assert resolve_suite("offline7", tasks, include_path) == [
        TaskSpec("my_yesno", "my_yesno", "acc_norm"), TaskSpec("my_group", "my_group", "acc"),
        TaskSpec("offline_arc_easy", "arc_easy", "acc_norm")]  # suite names keep their column and metric
    out = run_evaluation(cfg, "smollm2-135m", out_path=tmp_path / "m.json")
    assert set(out["tasks"]) == {"my_yesno", "my_group", "offline_arc_easy"}
    units = read_records(records_path(tmp_path / "m.json"))
    acc = units[units["measure"] == "acc"]
    # my_yesno (acc_norm, 4 of 6 docs): the mean of its per-doc outcomes, recomputed from the choice log-likelihoods
    mine = acc[acc["group"] == "my_yesno"]
    labels = [y for _, y in QUESTIONS]
    norm = [[ll / len(c) for ll, c in zip(lls, [" no", " yes"])] for lls in mine["choice_loglik"]]
    recomputed = [float(max(range(2), key=n.__getitem__) == labels[int(u)]) for n, u in zip(norm, mine["unit"])]
    assert out["tasks"]["my_yesno"]["n"] == 4 == len(mine)
    assert out["tasks"]["my_yesno"]["value"] == pytest.approx(sum(recomputed) / 4)
    # my_group: lm-eval's own aggregation, the size-weighted mean acc over its two tasks' docs (4 + 3)
    row = out["tasks"]["my_group"]
    assert row["metric"] == "acc" and row["tasks"] == ["my_yesno_b", "my_yesno_c"] and row["n"] == 7
    pooled = [float(max(range(2), key=lls.__getitem__) == DATA[g][int(u)][1])
              for g, u, lls in zip(acc["group"], acc["unit"], acc["choice_loglik"]) if g in row["tasks"]]
    assert len(pooled) == 7 and row["value"] == pytest.approx(sum(pooled) / 7)
    assert out["tasks"]["offline_arc_easy"]["column"] == "arc_easy"


@pytest.mark.parametrize("tasks, message", [
    (["my_yesnoo"], r"unknown task\(s\) 'my_yesnoo'.*did you mean my_yesno"),
    ([{"task": "my_yesno", "metric": "f1"}], r"task 'my_yesno' has no metric 'f1'; it reports acc, acc_norm"),
    (["no_agg"], r"group 'no_agg' reports no aggregate metric"),
    (["my_yesno", "overlap"], r"task\(s\) 'my_yesno' named both alone and in group 'overlap'"),
    ([{"task": "arc_easy", "metric": "f1"}, "my_yesno"], None),  # a suite task's metric: checked when loaded
])
def test_bad_tasks_fail_at_validation_in_one_line(include_path, tasks, message):
    if message is None:
        assert _cfg(include_path, tasks)["evaluation"]["tasks"] == tasks
        return
    with pytest.raises(ConfigError, match=r"invalid config field 'evaluation.tasks': " + message) as err:
        _cfg(include_path, tasks)
    assert "\n" not in str(err.value)


def test_include_path_must_be_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"'evaluation.include_path': '.*nope' is not a folder"):
        _cfg(str(tmp_path / "nope"), ["arc_easy"])
