"""Evaluation speed, measured side by side in one run (targets from issue 4):

1. zero-shot evaluation throughput of our in-memory route (load the model, `HFLM(pretrained=<model object>)`)
   vs the `lm_eval` CLI loading the same folder, on the same tasks and the same seeded doc subset (`--samples`);
   both run as fresh processes and are timed end to end (imports, task loading, model load, evaluation).
   Target: ours >= 1.0x. Accuracies must agree.
2. CPU prefill throughput (256 tokens -> 1) of SmolLM2 pruned at ratio 0.2 (uniform plan, magnitude scores)
   vs dense, timed alternately in one process. Target: >= 1.15x. Decode throughput (batch 8) is printed too.

3. loglikelihood throughput of our lm-eval backend (`hfprune.evaluation.backend.SharedContextLM`: each shared
   prefix computed once, rows batched across documents, output layer only at scored positions) vs the stock
   HFLM, in one process, alternating per task, on the same seeded offline7 docs. Only the time inside the LM's
   loglikelihood calls is timed (lm-eval's request building and metrics are the same for both). Per-choice
   log-likelihoods must agree within 1e-4 and accuracies exactly. Targets: SmolLM2 >= 1.7x, Qwen >= 1.5x.
   The last line printed is `eval backend speedup X.XXx (max |dloglik| Y)` (SmolLM2).

Full run:    python benchmarks/bench_eval.py
Quick run:   python benchmarks/bench_eval.py --quick       (part 3 only, SmolLM2, 20 docs per task, < 10 min)
Reduced run: python benchmarks/bench_eval.py --tasks arc_easy boolq --limit 10 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = ("smollm2-135m", "llama", "smollm2-135m")
QWEN = ("qwen2.5-coder-0.5b", "qwen2", "qwen2.5-coder-0.5b")


def _worker(args) -> None:
    """Our route in a fresh process: load the model, then lm-eval with the in-memory object."""
    from hfprune.evaluation.runner import evaluate_tasks, select_tasks
    from hfprune.models import ModelSpec, load_model
    from hfprune.tasks import resolve_suite

    model, tok = load_model(ModelSpec(*MODEL), args.resources)
    selection = select_tasks(resolve_suite("offline7", args.tasks), args.limit, args.seed)
    tasks, _, _ = evaluate_tasks(model, tok, selection, batch_size=args.batch_size)
    print("RESULT " + json.dumps({t: row["value"] for t, row in tasks.items()}))


def _timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def bench_lm_eval(args) -> None:
    from hfprune.evaluation.runner import select_tasks
    from hfprune.models import ModelSpec, ensure_available
    from hfprune.tasks import TASK_DIR, resolve_suite

    folder = ensure_available(ModelSpec(*MODEL), args.resources)
    selection = select_tasks(resolve_suite("offline7", args.tasks), args.limit, args.seed)
    names = list(selection.metrics)
    docs = sum(len(selection.samples.get(t, [])) or selection.docs_total[t] for t in names)
    ours_cmd = [sys.executable, __file__, "--worker", "--tasks", *args.tasks, "--seed", str(args.seed),
                "--batch-size", str(args.batch_size), "--resources", args.resources]
    ours_cmd += ["--limit", str(args.limit)] if args.limit is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        cli_cmd = [str(Path(sys.executable).with_name("lm_eval")), "run", "--model", "hf", "--model_args",
                   f"pretrained={folder},dtype=float32", "--tasks", ",".join(names), "--include_path",
                   str(TASK_DIR), "--batch_size", str(args.batch_size), "--device", "cpu",
                   "--output_path", tmp]
        if selection.samples:
            cli_cmd += ["--samples", json.dumps(selection.samples)]
        ours_s, ours_out = _timed(ours_cmd)
        cli_s, _ = _timed(cli_cmd)
        cli_results = json.loads(next(Path(tmp).rglob("results_*.json")).read_text())["results"]
    ours = json.loads(ours_out.split("RESULT ", 1)[1])
    agree = all(abs(ours[t] - cli_results[t][f"{m},none"]) < 1e-9 for t, m in selection.metrics.items())
    print(f"zero-shot eval, SmolLM2, tasks {names}, {docs} docs (limit {args.limit}, seed {args.seed}), "
          f"batch {args.batch_size}, end to end in fresh processes:")
    print(f"  ours (in-memory HFLM): {ours_s:7.1f} s  {docs / ours_s:6.2f} docs/s")
    print(f"  lm_eval CLI (folder):  {cli_s:7.1f} s  {docs / cli_s:6.2f} docs/s")
    print(f"  throughput ratio ours/CLI: {cli_s / ours_s:.2f}x (target >= 1.0x); metrics agree: {agree}")


def magnitude_scores(model) -> dict[str, torch.Tensor]:
    """|gate row| + |up row| + |down column| L1 norms per neuron: enough to build a plan for timing."""
    from hfprune.adapters import get_adapter

    adapter = get_adapter(model)
    out = {}
    for i in range(adapter.num_layers):
        mlp = adapter.mlp(i)
        out[f"mlp.{i}"] = (mlp.gate.weight.abs().sum(1) + mlp.up.weight.abs().sum(1)
                           + mlp.down.weight.abs().sum(0)).detach().float()
    return out


def bench_prefill(args) -> None:
    from hfprune.evaluation.efficiency import measure
    from hfprune.models import ModelSpec, load_model
    from hfprune.plan import make_plan
    from hfprune.surgery import prune_model

    dense, _ = load_model(ModelSpec(*MODEL), args.resources)
    plan = make_plan(magnitude_scores(dense), dense.config, 0.2, "llama")
    pruned = prune_model(copy.deepcopy(dense), plan)
    res = measure({"dense": dense, "pruned": pruned}, prefill_tokens=256, decode_batch=8,
                  decode_tokens=args.decode_tokens, repeats=args.repeats)
    d, p = res["dense"], res["pruned"]
    print(f"SmolLM2 ratio 0.2 (uniform, {len(plan['layers'][0]['mlp_keep'])}/{dense.config.intermediate_size} "
          f"neurons kept, achieved {plan['achieved_ratio']:.3f}), CPU {torch.get_num_threads()} threads, "
          f"median of {args.repeats}, interleaved:")
    print(f"  params      dense {d['params']:,}  pruned {p['params']:,}  ratio {p['params'] / d['params']:.3f}")
    print(f"  prefill 256 dense {d['prefill_ms']:.1f} ms ({256e3 / d['prefill_ms']:.0f} tok/s)  pruned "
          f"{p['prefill_ms']:.1f} ms ({256e3 / p['prefill_ms']:.0f} tok/s)  "
          f"speed-up {d['prefill_ms'] / p['prefill_ms']:.2f}x (target >= 1.15x)")
    print(f"  decode b8   dense {d['decode_tok_s']:.1f} tok/s  pruned {p['decode_tok_s']:.1f} tok/s  "
          f"speed-up {p['decode_tok_s'] / d['decode_tok_s']:.2f}x")


def _backend_pass(lm, selection, task: str) -> tuple[float, dict, float | None, int]:
    """One lm-eval run of `task` with `lm`; returns (seconds inside loglikelihood, per-choice logliks by doc,
    accuracy, requests)."""
    import lm_eval

    seconds, count = 0.0, 0
    inner = lm.loglikelihood

    def timed(requests, *a, **k):
        nonlocal seconds, count
        start = time.perf_counter()
        out = inner(requests, *a, **k)
        seconds += time.perf_counter() - start
        count += len(requests)
        return out

    lm.loglikelihood = timed
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=[selection.tasks[task]], task_manager=selection.task_manager,
                                      samples={task: selection.samples[task]} if task in selection.samples else None,
                                      log_samples=True)
    finally:
        del lm.loglikelihood
    lls = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in res["samples"][task]}
    acc = res["results"][task].get(f"{selection.metrics[task]},none")
    return seconds, lls, acc, count


def bench_backend(args, models) -> str:
    """Part 3: stock HFLM vs SharedContextLM, alternating per task; returns the last line (first model's)."""
    import logging

    from lm_eval.models.huggingface import HFLM

    from hfprune.evaluation.backend import SharedContextLM
    from hfprune.evaluation.runner import select_tasks
    from hfprune.models import ModelSpec, load_model
    from hfprune.tasks import resolve_suite
    from hfprune.windows import bos_prefix

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    last = None
    for entry in models:
        model, tok = load_model(ModelSpec(*entry), args.resources)
        add_bos = bool(bos_prefix(tok))
        lms = {name: cls(pretrained=model, tokenizer=tok, batch_size=args.batch_size, add_bos_token=add_bos)
               for name, cls in (("stock", HFLM), ("shared", SharedContextLM))}
        specs = resolve_suite("offline7", args.tasks)
        limit = args.backend_limit if entry == MODEL else max(5, args.backend_limit // 2)
        names = [s.task for s in specs]
        seconds = {b: dict.fromkeys(names, float("inf")) for b in lms}
        lls, accs, docs, reqs = {}, {}, {}, {}
        for rnd in range(args.backend_rounds):
            for i, task in enumerate(names):
                order = ["stock", "shared"] if (i + rnd) % 2 == 0 else ["shared", "stock"]
                for b in order:
                    selection = select_tasks(specs, limit, args.seed)  # fresh Task objects each run
                    s, ll, acc, n = _backend_pass(lms[b], selection, task)
                    seconds[b][task] = min(seconds[b][task], s)
                    lls[b, task], accs[b, task], docs[task], reqs[task] = ll, acc, len(ll), n
        print(f"eval backend, {entry[0]}, offline7, {limit} docs/task (seed {args.seed}), batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads, fp32, best of {args.backend_rounds} alternating rounds "
              "(time inside loglikelihood calls):")
        worst, same_acc = 0.0, True
        for task in names:
            d = max(abs(a - b) for doc, row in lls["stock", task].items()
                    for a, b in zip(row, lls["shared", task][doc], strict=True))
            worst = max(worst, d)
            same_acc &= accs["stock", task] == accs["shared", task]
            st, sh = seconds["stock"][task], seconds["shared"][task]
            print(f"  {task:24s} {docs[task]:3d} docs {reqs[task]:4d} req  stock {docs[task] / st:6.2f} docs/s  "
                  f"shared {docs[task] / sh:6.2f} docs/s  {st / sh:5.2f}x  max|dll| {d:.1e}  "
                  f"acc {accs['stock', task]:.3f}/{accs['shared', task]:.3f}")
        total_docs = sum(docs.values())
        st, sh = sum(seconds["stock"].values()), sum(seconds["shared"].values())
        print(f"  total {total_docs} docs: stock {st:.1f} s ({total_docs / st:.2f} docs/s), shared {sh:.1f} s "
              f"({total_docs / sh:.2f} docs/s), speedup {st / sh:.2f}x (target "
              f"{'1.7' if entry == MODEL else '1.5'}x); max |dloglik| {worst:.1e} (<= 1e-4); "
              f"accuracies identical: {same_acc}")
        line = f"eval backend speedup {st / sh:.2f}x (max |dloglik| {worst:.1e})"
        last = last or line
        del lms, model
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "arc_challenge", "boolq", "piqa", "hellaswag",
                                                        "winogrande", "openbookqa"])
    parser.add_argument("--limit", type=int, default=50, help="docs per task (seeded random subset)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timing repeats for prefill/decode")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--resources", default="resources")
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="only the backend comparison (part 3), SmolLM2, --backend-limit docs per task")
    parser.add_argument("--backend-limit", type=int, default=20, help="docs per task for part 3")
    parser.add_argument("--backend-rounds", type=int, default=None,
                        help="alternating timing rounds for part 3 (default: 1 with --quick, else 2)")
    parser.add_argument("--backend-models", nargs="+", choices=[MODEL[0], QWEN[0]], default=None,
                        help="models of part 3 (default: SmolLM2 with --quick, else both)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    chosen = [m for m in (MODEL, QWEN) if m[0] in (args.backend_models or [])]
    torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args)
        return
    if args.backend_rounds is None:
        args.backend_rounds = 1 if args.quick else 2
    if args.quick:
        print(bench_backend(args, chosen or [MODEL]))
        return
    if not args.skip_lm_eval:
        bench_lm_eval(args)
    bench_prefill(args)
    print(bench_backend(args, chosen or [MODEL, QWEN]))


if __name__ == "__main__":
    main()
