"""Evaluation speed, measured side by side in one run (targets from issue 4):

1. zero-shot evaluation throughput of our in-memory route (load the model, `HFLM(pretrained=<model object>)`)
   vs the `lm_eval` CLI loading the same folder, on the same tasks and the same seeded doc subset (`--samples`);
   both run as fresh processes and are timed end to end (imports, task loading, model load, evaluation).
   Target: ours >= 1.0x. Accuracies must agree.
2. CPU prefill throughput (256 tokens -> 1) of SmolLM2 pruned at ratio 0.2 (uniform plan, magnitude scores)
   vs dense, timed alternately in one process. Target: >= 1.15x. Decode throughput (batch 8) is printed too.

Full run:    python benchmarks/bench_eval.py
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
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if not args.skip_lm_eval:
        bench_lm_eval(args)
    bench_prefill(args)


if __name__ == "__main__":
    main()
