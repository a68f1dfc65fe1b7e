"""Evaluation on the real SmolLM2-135M: lm-eval in memory == lm-eval loading the folder; real-text perplexity."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hfprune.evaluation.perplexity import source_perplexity
from hfprune.evaluation.runner import evaluate_tasks, select_tasks
from hfprune.plan import make_plan
from hfprune.surgery import prune_model, save_pruned
from hfprune.tasks import resolve_suite

pytestmark = pytest.mark.slow


def _per_doc_loglikelihoods(samples: dict) -> dict:
    return {task: {s["doc_id"]: [resp[0][0] for resp in s["resps"]] for s in rows} for task, rows in samples.items()}


def _folder_route(folder, selection, batch_size):
    """lm-eval's own route: HFLM loads the saved folder by path (as `lm_eval --model hf` does)."""
    import lm_eval

    return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(folder), "dtype": "float32"},
                                   tasks=list(selection.metrics), task_manager=selection.task_manager,
                                   samples=selection.samples, batch_size=batch_size, device="cpu",
                                   log_samples=True)


def test_in_memory_route_equals_lm_eval_folder_route(smollm2, smollm2_dir, tmp_path):
    model, tok = smollm2
    specs = resolve_suite("offline7", ["arc_easy", "boolq"])
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    scores = {f"mlp.{i}": torch.rand(cfg.intermediate_size, generator=gen) for i in range(cfg.num_hidden_layers)}
    pruned = prune_model(copy.deepcopy(model), make_plan(scores, cfg, 0.2, "llama"))
    pruned_dir = save_pruned(pruned, tok, tmp_path / "pruned")
    per_model = []
    for in_memory, folder in ((model, smollm2_dir), (pruned, pruned_dir)):
        # ours: tasks built from their drawn docs; lm-eval's: the whole split, its own `samples` selection
        mem_sel, ref_sel = select_tasks(specs, 4, 7), select_tasks(specs, 4, 7, preselect=False)
        tasks, meta, mem = evaluate_tasks(in_memory, tok, mem_sel, batch_size=4, log_samples=True)
        ref = _folder_route(folder, ref_sel, 4)
        got = {task: {mem_sel.doc_id(task, d): lls for d, lls in docs.items()}  # the full split's doc ids
               for task, docs in _per_doc_loglikelihoods(mem["samples"]).items()}
        want = _per_doc_loglikelihoods(ref["samples"])
        assert got.keys() == want.keys() == {"offline_arc_easy", "offline_boolq"}
        for task, docs in got.items():
            assert sorted(docs) == mem_sel.samples[task] == ref_sel.samples[task] == sorted(want[task])
            for doc_id, lls in docs.items():
                assert lls == pytest.approx(want[task][doc_id], abs=1e-4)
            assert tasks[task]["value"] == ref["results"][task][f"{tasks[task]['metric']},none"]
        assert meta["add_bos_token"] is False  # SmolLM2's tokenizer adds no BOS; lm-eval's folder route neither
        per_model.append(got)
    assert per_model[0] != per_model[1]  # the pruned model really differs from the dense one


def test_real_text_perplexity_equals_exp_mean_loss(smollm2):
    from hfprune.data import load_texts

    model, tok = smollm2
    got = source_perplexity(model, tok, "wiki", seq_len=64, max_tokens=640, batch_size=4)
    stream = []  # independent: tokenize the documents, join with EOS, cut into 10 windows of 64
    for text in load_texts("wiki"):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= 640:
            break
    windows = torch.tensor(stream[:640]).view(10, 64)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert got["tokens"] == 10 * 63 and got["seq_len"] == 64
    assert got["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert 2 < got["ppl"] < 200  # a working LM on Wikipedia text
