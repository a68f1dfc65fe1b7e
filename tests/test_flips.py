"""Answer flips against the dense model, from real lm-eval runs of tiny random models; top-1 agreement."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_model

from hfprune import comparisons
from hfprune.errors import HFPruneError
from hfprune.evaluation.fidelity import fidelity, position_metrics
from hfprune.evaluation.records import COLUMNS, fidelity_records, records_path, task_records, write_records
from hfprune.evaluation.runner import evaluate_tasks, select_tasks
from hfprune.flips import flip_records
from hfprune.runtime import write_json
from hfprune.tasks import resolve_suite
from hfprune.validation import validate_config

VOCAB = 49152  # SmolLM2's tokenizer
# acc_norm (4 choices, normalised by characters), acc, and a multiple-input task (its choices are contexts)
TASKS = ["arc_easy", "boolq", "winogrande"]


@pytest.fixture(scope="module")
def runs(smollm2_dir):
    """{name: (per-unit records, lm-eval's logged samples)} of three tiny random models on the same docs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    selection = select_tasks(resolve_suite("offline7", TASKS), 8, 0)
    out = {}
    for name, seed in (("dense", 0), ("a", 1), ("b", 2)):
        model = tiny_model("llama", seed=seed, vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=1,
                           eos_token_id=2, pad_token_id=2)
        _, _, raw = evaluate_tasks(model, tok, selection, batch_size=8, log_samples=True)
        out[name] = (pd.DataFrame(task_records(selection, raw["samples"]), columns=COLUMNS), raw["samples"])
    return selection, out


def _answers(selection, samples) -> dict[tuple[str, str], int]:
    """Each doc's answer straight from lm-eval's logged samples, checked against lm-eval's own 0/1 outcome."""
    out = {}
    for task, metric in selection.metrics.items():
        lm_task = selection.tasks[task]
        for s in samples[task]:
            lls = np.array([r[0] for r in s["filtered_resps"]])
            lengths = np.array([len(c) for c in lm_task.doc_to_choice(s["doc"])], dtype=float)
            answer = int(np.argmax(lls / lengths if metric == "acc_norm" else lls))
            gold = (lm_task.doc_to_text if lm_task.multiple_input else lm_task.doc_to_target)(s["doc"])
            assert s[metric] == float(answer == gold)
            out[(task, str(selection.doc_id(task, s["doc_id"])))] = answer  # the full split's doc id
    return out


def test_flip_records_are_the_answers_that_differ(runs):
    selection, out = runs
    dense, a = out["dense"][0], out["a"][0]
    flips = flip_records(a, dense)
    want = _answers(selection, out["dense"][1])
    got = _answers(selection, out["a"][1])
    assert len(flips) == len(want) == 3 * 8 and set(flips["measure"]) == {"flip"}
    independent = {key: float(got[key] != want[key]) for key in want}
    assert dict(zip(zip(flips["group"], flips["unit"]), flips["value"])) == independent
    rate = float(np.mean(list(independent.values())))
    assert flips["value"].mean() == pytest.approx(rate) and 0 < rate < 1
    acc = a[a["measure"] == "acc"].set_index(["group", "unit"])["cluster"]
    assert list(flips.set_index(["group", "unit"])["cluster"]) == list(acc.loc[flips.set_index(["group", "unit"]).index])
    assert flip_records(a, a)["value"].eq(0).all() and len(flip_records(a, a)) == len(flips)


def test_flip_records_need_the_same_docs_and_normalisations(runs):
    _, out = runs
    dense, a = out["dense"][0], out["a"][0]
    with pytest.raises(HFPruneError, match="did not answer the same docs") as err:
        flip_records(a, dense[dense["unit"] != dense["unit"].iloc[0]])
    assert "\n" not in str(err.value)
    assert flip_records(a.drop(columns="choice_norm"), dense).empty  # records written before choice_norm
    perplexity_only = dense[dense["measure"] != "acc"]
    assert flip_records(a, perplexity_only).empty


def test_comparisons_see_flip_rates(runs, tmp_path):
    """load_cell adds a pruned cell's flips against the dense row; the tables compare them like any measure."""
    _, out = runs
    cfg = validate_config({"experiment": "flips", "results_dir": str(tmp_path / "results"),
                           "models": [{"name": "tiny", "family": "llama", "source": "smollm2-135m"}],
                           "criteria": ["magnitude", "random"], "ratios": [0.2], "calibration": {"seeds": [0]}})
    def write(criterion: str, ratio: float, name: str) -> None:
        for path in comparisons.cell_files(cfg, "tiny", criterion, ratio).values():
            write_records(records_path(path), out[name][0].to_dict("records"))
            write_json(path, {})

    write("magnitude", 0.2, "a")
    write("random", 0.2, "b")
    assert "flip" not in set(pd.concat(comparisons.load_cell(cfg, "tiny", "magnitude", 0.2).values())["measure"])
    write("dense", 0.0, "dense")  # flips once the dense row exists
    cells = {"magnitude": comparisons.load_cell(cfg, "tiny", "magnitude", 0.2),
             "random": comparisons.load_cell(cfg, "tiny", "random", 0.2),
             comparisons.DENSE: comparisons.load_cell(cfg, "tiny", "dense", 0.0)}
    assert "flip" not in set(cells[comparisons.DENSE][None]["measure"])
    assert all("flip" in set(units["measure"]) for c in ("magnitude", "random") for units in cells[c].values())
    rate = {c: flip_records(out[n][0], out["dense"][0]).groupby("group")["value"].mean().mean()
            for c, n in (("magnitude", "a"), ("random", "b"))}
    table = comparisons.comparison_table(cells, [("magnitude", "random"), ("magnitude", comparisons.DENSE),
                                                 ("random", comparisons.DENSE)], headline=True)
    flips = table[table["measure"] == "flip:average"].set_index(["a", "b"])
    assert flips.loc[("magnitude", comparisons.DENSE), "diff"] == pytest.approx(rate["magnitude"])  # the flip rate
    assert flips.loc[("magnitude", "random"), "diff"] == pytest.approx(rate["magnitude"] - rate["random"])
    assert set(flips["label"]) == {"flips (pp) average"} and not flips["higher_is_better"].any()
    assert (flips["scale"] == 100.0).all()
    detail = comparisons.comparison_table(cells, [("magnitude", "random")])
    assert {f"flip:offline_{t}" for t in TASKS} <= set(detail["measure"])


def test_top1_agreement_matches_independent_argmax():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():  # a perturbed copy: some argmax tokens move, not all
        for param in other.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    ids = torch.randint(0, 211, (5, 12), generator=torch.Generator().manual_seed(4))
    got = fidelity(model, other, ids, top_k=5, batch_size=2)
    with torch.no_grad():  # independent: each prompt alone, argmax token of each position
        same = [(model(input_ids=row[None]).logits.argmax(-1) == other(input_ids=row[None]).logits.argmax(-1))
                .double().mean().item() for row in ids]
    assert got["per_prompt"]["top1_agreement"] == pytest.approx(same)
    assert got["top1_agreement"] == pytest.approx(np.mean(same)) and 0 < got["top1_agreement"] < 1
    assert fidelity(model, model, ids, top_k=5)["top1_agreement"] == 1.0
    got.update(source="lambada", prompt_doc=[0, 0, 1, 1, 2])
    top1 = [r for r in fidelity_records(got) if r["measure"] == "top1"]
    assert [r["value"] for r in top1] == pytest.approx(same) and [r["cluster"] for r in top1][-1] == "doc:2"
    logits = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(5))
    assert position_metrics(logits, logits.flip(-1), 5)["top1_agreement"].eq(0).all()  # argmax moved: 0
