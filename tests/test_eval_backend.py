"""The `shared` lm-eval backend (hfprune.evaluation.backend) gives the stock HFLM's answers: per-choice
log-likelihoods within 1e-4 and identical accuracies on every offline7 task, for dense and pruned real models of
both families, through lm-eval with log_samples; exact request-level equality on tiny models (non-uniform plans,
truncation, shared/one-token continuations, eager and sdpa attention); stock fallback for other request types."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hfprune.errors import HFPruneError
from hfprune.evaluation.backend import SharedContextLM, group_requests, lm_class
from hfprune.evaluation.runner import evaluate_tasks, select_tasks
from hfprune.models import ModelSpec, load_model
from hfprune.plan import make_plan
from hfprune.surgery import prune_model
from hfprune.tasks import resolve_suite
from tests.conftest import REPO_RESOURCES, tiny_model


def _random_plan(model, ratio, family, allocation="uniform", seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    scores = {f"mlp.{i}": torch.rand(cfg.intermediate_size, generator=gen) for i in range(cfg.num_hidden_layers)}
    return make_plan(scores, cfg, ratio, family, allocation=allocation)


def _per_choice(res: dict) -> dict:
    return {(task, s["doc_id"]): [r[0][0] for r in s["resps"]] for task, rows in res["samples"].items()
            for s in rows}


def _compare_suite(model, tok, limit: int):
    """lm-eval on offline7 with both backends (log_samples on); per-choice logliks and accuracies must agree."""
    specs = resolve_suite("offline7", None)
    out = {}
    for backend in ("stock", "shared"):
        selection = select_tasks(specs, limit, 11, backend=backend)  # fresh Task objects per run
        tasks, meta, res = evaluate_tasks(model, tok, selection, batch_size=4, log_samples=True)
        assert meta["backend"] == backend
        out[backend] = tasks, _per_choice(res)
    (stock_tasks, stock_ll), (shared_tasks, shared_ll) = out["stock"], out["shared"]
    assert stock_ll.keys() == shared_ll.keys() and len({t for t, _ in stock_ll}) == 7
    for key, want in stock_ll.items():
        # fp32 rounding of a long continuation's sum: stock vs stock at batch 1 vs 4 differs by ~2e-5 at -37, and
        # a badly pruned model's WinoGrande suffix reaches -90 (2e-4 apart, 2e-6 relative)
        assert shared_ll[key] == pytest.approx(want, abs=1e-4, rel=5e-6), key
    assert {t: r["value"] for t, r in shared_tasks.items()} == {t: r["value"] for t, r in stock_tasks.items()}
    return stock_ll


@pytest.mark.slow
def test_smollm2_dense_and_pruned_match_stock_on_offline7(smollm2):
    model, tok = smollm2
    dense = _compare_suite(model, tok, limit=3)
    pruned_model = prune_model(copy.deepcopy(model), _random_plan(model, 0.2, "llama"))
    pruned = _compare_suite(pruned_model, tok, limit=3)
    assert dense != pruned


@pytest.mark.slow
def test_qwen_dense_and_pruned_match_stock_on_offline7(qwen_dir):
    model, tok = load_model(ModelSpec("qwen2.5-coder-0.5b", "qwen2", "qwen2.5-coder-0.5b"), REPO_RESOURCES)
    _compare_suite(model, tok, limit=1)
    _compare_suite(prune_model(model, _random_plan(model, 0.2, "qwen2")), tok, limit=1)


# ---- tiny models: request-level equality ------------------------------------------------------------------------
def _requests(vocab: int, seed: int = 0):
    """Token-level requests as lm-eval passes them: ((context, continuation) key, context ids, continuation ids).
    Shared contexts with multi- and one-token continuations, a continuation extending another, contexts that
    differ only at the end (WinoGrande-like), and inputs longer than max_length (left-truncated)."""
    gen = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    reqs = []
    for doc in range(6):
        ctx = toks(5 + 3 * doc)
        conts = [toks(1 + (doc + k) % 4) for k in range(4)]
        conts.append(conts[0] + toks(2))  # extends another choice
        conts.append(toks(1))
        conts.append(toks(1))  # two one-token choices
        reqs += [((f"c{doc}", f"x{k}"), ctx, cont) for k, cont in enumerate(conts)]
    head = toks(7)
    reqs += [(("w", "a"), head + toks(2), toks(4)), (("w", "b"), head + toks(3), toks(4))]
    reqs += [(("long", "a"), toks(40), toks(5)), (("long", "b"), toks(50), toks(9)), (("long", "c"), toks(3), toks(32))]
    order = torch.randperm(len(reqs), generator=gen).tolist()
    return [reqs[i] for i in order]


def _tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_nonuniform_pruned_equals_stock(family, attn, smollm2_dir):
    tok = _tokenizer(smollm2_dir)
    model = tiny_model(family, vocab_size=len(tok), max_position_embeddings=32)
    model.set_attn_implementation(attn)
    plan = _random_plan(model, 0.003, family, allocation="global", seed=3)  # big vocab: tiny ratio
    assert len({len(layer["mlp_keep"]) for layer in plan["layers"]}) > 1  # non-uniform
    model = prune_model(model, plan)
    reqs = _requests(len(tok))
    ctx = reqs[0][1]
    with torch.no_grad():
        greedy = model(torch.tensor([ctx])).logits[0, -1].argmax().item()
    reqs.append((("greedy", "g"), ctx, [greedy]))  # a continuation that is the argmax: is_greedy True
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=32)
    shared = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=32, row_tokens=48)
    want = stock._loglikelihood_tokens(reqs, disable_tqdm=True)
    got = shared._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert len(got) == len(want) == len(reqs)
    for (key, _, _), (g, gg), (w, wg) in zip(reqs, got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4), key
        assert gg == wg, key
    assert want[-1][1] and got[-1][1]


def test_grouping_shares_prefixes():
    inputs = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7], [1, 2, 3, 4], [9, 9, 9], [1, 8]]
    groups = group_requests(inputs, max_row_tokens=64)
    by_member = {tuple(sorted(g.members)): g.prefix_len for g in groups}
    assert by_member == {(0, 1, 2): 4, (3,): 3, (4,): 2}  # [1, 8] shares 1 token of 2: not worth a group


def test_bf16_runs_and_stays_close(smollm2_dir):
    tok = _tokenizer(smollm2_dir)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=32, dtype=torch.bfloat16)
    reqs = _requests(len(tok))[:12]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=32, softmax_dtype="float32")
    got = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=32)
    for (g, _), (w, _) in zip(got._loglikelihood_tokens(reqs, True), want._loglikelihood_tokens(reqs, True),
                              strict=True):
        assert g == pytest.approx(w, abs=0.25)


def _mask_ignoring_attention(module, query, key, value, attention_mask, **kwargs):
    """A real kernel that drops custom masks, as flash-attention does: causal attention over the whole row."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_route_check_passes_rounding_and_stops_a_kernel_that_ignores_the_tree_mask(smollm2_dir, dtype):
    """bf16 rounding moves SmolLM2's log-probs by ~0.4 between two correct routes (an absolute 0.25 bound stopped
    real bf16 runs); a kernel that ignores the tree mask is ~10 off, and must stop with a one-line error."""
    model, tok = load_model(ModelSpec("smollm2-135m", "llama", "smollm2-135m"), REPO_RESOURCES, dtype)
    text = tok("The quick brown fox jumps over the lazy dog and then runs far away.")["input_ids"]
    SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4)._check_route(text)  # passes
    AttentionInterface.register("mask_ignoring", _mask_ignoring_attention)
    model.set_attn_implementation("mask_ignoring")
    with pytest.raises(HFPruneError, match="the packed-tree route differs .* with attention 'mask_ignoring'"):
        SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4)._check_route(text)


def test_other_request_types_fall_back_to_stock_and_bad_requests_fail(smollm2_dir):
    tok = _tokenizer(smollm2_dir)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=64)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    shared = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=2)
    gen = [Instance("generate_until", {}, ("The capital of France is", {"until": ["\n"], "max_gen_toks": 4}), 0)]
    assert shared.generate_until(gen, disable_tqdm=True) == stock.generate_until(gen, disable_tqdm=True)
    rolling = [Instance("loglikelihood_rolling", {}, ("A rolling text that is scored token by token. " * 3,), 0)]
    assert shared.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        stock.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-4)
    with pytest.raises(HFPruneError, match="non-empty context"):
        shared._loglikelihood_tokens([(("a", ""), [5, 6], [])])
    with pytest.raises(HFPruneError, match="evaluation.backend"):
        lm_class("vllm")
