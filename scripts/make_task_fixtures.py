"""Write the paper10 task fixtures of config/rehearsal.yaml: small parquet files in the hub datasets' own schemas
and file layout (<dataset id>/<config>/<split>-00000-of-00001.parquet), which the stock lm-eval task YAMLs read
through `evaluation.task_data` (the same `datasets.load_dataset` call, pointed at local files).

Seven tasks take their first rows from the offline rebuilds of the stock splits (hfprune.tasks.offline: real
docs). CrowS-Pairs, RACE and TruthfulQA have no offline copy: their rows are made up here, in the exact schema
the stock task code reads, to exercise prompts, targets and metrics (their accuracies mean nothing).

    python scripts/make_task_fixtures.py        # rewrites the task files under tests/fixtures/hub (committed)
"""

from __future__ import annotations

from pathlib import Path

import datasets

from hfprune.tasks.offline import SPLITS, build

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hub"
ROWS = 8
# stock task -> hub dataset id and config of its data (lm-eval 0.4.13 task YAMLs)
HUB = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "boolq": ("aps/super_glue", "boolq"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "piqa": ("baber/piqa", "default"),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "crows_pairs_english": ("jannalu/crows_pairs_multilingual", "english"),
    "race": ("EleutherAI/race", "high"),
    "social_iqa": ("lighteval/siqa", "default"),
    "truthfulqa_mc2": ("truthfulqa/truthful_qa", "multiple_choice"),
}

_RACE_PROBLEMS = [
    {"answer": "B", "options": ["a river", "a library", "a farm", "a harbour"],
     "question": "Where did Anna spend the afternoon?"},
    {"answer": "C", "options": ["she was tired", "it rained", "the doors closed", "her friend called"],
     "question": "Why did Anna leave?"},
]
MADE_UP: dict[str, list[dict]] = {
    "crows_pairs_english": [
        {"sent_more": f"People from town {i} are bad at maths.", "sent_less": f"People from city {i} are bad at maths.",
         "stereo_antistereo": "stereo", "bias_type": "nationality", "annotations": "[]", "anon_writer": "a",
         "anon_annotators": "[]"} for i in range(4)],
    "race": [
        {"example_id": f"high{i}.txt", "article": "Anna went to the library after school. It was quiet, and she read "
         f"for {i + 2} hours until the doors closed at six.", "problems": repr(_RACE_PROBLEMS)} for i in range(4)],
    "truthfulqa_mc2": [
        {"question": f"What happens if you drop a glass {i + 1} metres onto stone?",
         "mc1_targets": {"choices": ["It is likely to break.", "It bounces back up."], "labels": [1, 0]},
         "mc2_targets": {"choices": ["It is likely to break.", "It may shatter.", "It turns into water."],
                         "labels": [1, 1, 0]}} for i in range(4)],
}
# the split each stock task evaluates (lm-eval prefers test over validation)
SPLIT = {**{task: split for task, (split, _) in SPLITS.items()}, "crows_pairs_english": "test", "race": "test",
         "truthfulqa_mc2": "validation"}


def fixture_path(task: str) -> Path:
    hub_id, config = HUB[task]
    return OUT / hub_id / config / f"{SPLIT[task]}-00000-of-00001.parquet"


def main() -> None:
    for task in HUB:
        rows = (datasets.Dataset.from_list(MADE_UP[task]) if task in MADE_UP
                else build(task)[SPLIT[task]].select(range(ROWS)))
        path = fixture_path(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(str(path))
        print(f"{path.relative_to(OUT.parents[2])}: {rows.num_rows} rows")


if __name__ == "__main__":
    main()
