"""Scoring speed and memory, measured side by side in one run (CPU, fp32, 2 threads by default).

Each variant runs in a fresh subprocess; its peak RSS is reset after the model is loaded (VmHWM), so it
covers scoring only. Wall-clock ratios need a quiet machine; CPU-time ratios are printed too. Prints ratios against the targets:
  (a) SmolLM2: hfprune taylor_entropy vs the released loop (benchmarks/_official.py, bf16 accumulation as
      released: <= 0.75x time, <= 0.85x peak) and vs the floor (<= 1.05x time); kept sets at ratio 0.2 identical
      to the released loop run exactly (float64 throughout); printed beside it, how many neurons the released
      loop itself flips at fp32 and as released (bf16 accumulation), and how close to the cut they lie;
  (b) taylor_ce + taylor_entropy from one shared forward vs run apart (<= 0.8x time);
  (c) Qwen2.5-Coder-0.5B, 1024-token sequences: peak memory vs the official algorithm (<= 0.6x);
  (d) taylor_kd vs taylor_entropy (time, memory; the paper reports ~3x time on 7B).
Usage: python benchmarks/bench_score.py [--only a,b,c,d] [--sequences 32] [--seq-len 256]
       [--qwen-sequences 2] [--qwen-seq-len 1024] [--batch-size 4] [--threads 2] [--logits-chunk N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": ("smollm2-135m", "llama"), "qwen": ("qwen2.5-coder-0.5b", "qwen2")}


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the peak covers scoring only, not the transient of loading the model."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset: bool) -> float:
    if reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args) -> None:
    """Child process: load, build batches, time one scoring variant, print a JSON line."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _official import floor_pass, official_entropy_scores
    from safetensors.torch import save_file

    from hfprune.data import load_texts
    from hfprune.models import ModelSpec, load_model
    from hfprune.scorer import calibration_batches, score_model
    from hfprune.windows import sample_windows

    torch.set_num_threads(args.threads)
    source, family = MODELS[args.model]
    model, tok = load_model(ModelSpec(source, family, source), str(ROOT / "resources"))
    tokens = sample_windows(tok, load_texts("calibration"), args.sequences, args.seq_len, 0)
    batches = calibration_batches(tokens, args.batch_size)
    plain = [b["input_ids"] for b in batches]
    if args.variant == "official_fp64":
        model = model.double()
    base_rss = _rss_mb()
    reset = _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    scores = None
    if args.variant == "official":  # as released: bf16 accumulation
        scores = official_entropy_scores(model, plain)
    elif args.variant == "official_fp32":
        scores = official_entropy_scores(model, plain, accumulate_dtype=torch.float32)
    elif args.variant == "official_fp64":
        scores = official_entropy_scores(model, plain, accumulate_dtype=torch.float64)
    elif args.variant == "floor":
        floor_pass(model, plain)
    else:
        out = score_model(model, batches, args.variant.split("+"), logits_chunk=args.logits_chunk)
        scores = out[args.variant.split("+")[-1]]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if scores is not None and args.scores_out:
        save_file({k: v.contiguous() for k, v in scores.items()}, args.scores_out)
    peak = _peak_rss_mb(reset)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_mb": peak, "base_mb": base_rss}))


def measure(variant: str, model: str, sequences: int, seq_len: int, opts, scores_out: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", model, "--sequences", str(sequences),
           "--seq-len", str(seq_len), "--batch-size", str(opts.batch_size), "--threads", str(opts.threads),
           "--scores-out", scores_out] + (["--logits-chunk", str(opts.logits_chunk)] if opts.logits_chunk else [])
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"  {model:8s} {variant:26s} {out['seconds']:7.1f} s wall {out['cpu_seconds']:7.1f} s CPU   "
          f"peak {out['peak_mb']:6.0f} MiB (+{out['peak_mb'] - out['base_mb']:.0f} over the loaded model)", flush=True)
    return out


def kept_set_difference(path: str, reference: str, model: str, ratio: float = 0.2) -> tuple[int, float]:
    """Neurons kept under one score file and not the other (uniform plans at `ratio`), and how far the farthest
    of them lies from its layer's cut in the reference scores (relative to the cut; 0 when none differ)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from hfprune.plan import make_plan

    config = AutoConfig.from_pretrained(ROOT / "resources" / "models" / MODELS[model][0])
    ref = load_file(reference)
    plans = [make_plan(scores, config, ratio, MODELS[model][1]) for scores in (load_file(path), ref)]
    diff, farthest = 0, 0.0
    for i, (a, b) in enumerate(zip(*(plan["layers"] for plan in plans))):
        flipped = set(a["mlp_keep"]) ^ set(b["mlp_keep"])
        if flipped:
            layer = ref[f"mlp.{i}"].double()
            cut = layer[b["mlp_keep"]].min()
            farthest = max(farthest, max(abs(layer[j].item() - cut.item()) for j in flipped) / cut.item())
        diff += len(flipped)
    return diff, farthest


def score_error(path: str, reference: str) -> tuple[float, float]:
    """Median and 99th percentile over all neurons of |score - reference| / reference."""
    import torch
    from safetensors.torch import load_file

    got, ref = load_file(path), load_file(reference)
    rel = torch.cat([((got[k].double() - ref[k].double()) / ref[k].double()).abs() for k in ref])
    rel = rel[torch.isfinite(rel)]
    return rel.median().item(), rel.quantile(0.99).item()


def verdict(name: str, value: float, target: float) -> None:
    print(f"  {name:58s} {value:6.3f}x  (target <= {target}x: {'OK' if value <= target else 'MISSED'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="a,b,c,d")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--qwen-sequences", type=int, default=2)
    p.add_argument("--qwen-seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--logits-chunk", type=int, help="counted tokens per chunk of the output-loss gradient "
                   "(default: the scorer's, 256 MiB of fp32 logits)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    p.add_argument("--scores-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        return run_variant(args)
    only = set(args.only.split(","))
    n, t = args.sequences, args.seq_len
    print(f"bench_score: CPU fp32, {args.threads} threads, batch size {args.batch_size}; "
          f"SmolLM2 {n} x {t} tokens, Qwen {args.qwen_sequences} x {args.qwen_seq_len}")
    tmp = tempfile.mkdtemp(prefix="bench_score.")
    cache: dict = {}

    def m(variant, model="smollm2", scores_out=""):
        key = (variant, model)
        if key not in cache:
            seqs, length = (n, t) if model == "smollm2" else (args.qwen_sequences, args.qwen_seq_len)
            cache[key] = measure(variant, model, seqs, length, args, scores_out)
        return cache[key]

    if "a" in only:
        print("(a) SmolLM2 taylor_entropy: hfprune vs official vs floor")
        ours = m("taylor_entropy", scores_out=f"{tmp}/ours.safetensors")
        off = m("official", scores_out=f"{tmp}/official.safetensors")
        m("official_fp32", scores_out=f"{tmp}/official_fp32.safetensors")
        floor = m("floor")
        verdict("time, hfprune / official", ours["seconds"] / off["seconds"], 0.75)
        verdict("peak memory, hfprune / official", ours["peak_mb"] / off["peak_mb"], 0.85)
        verdict("time, hfprune / floor", ours["seconds"] / floor["seconds"], 1.05)
        m("official_fp64", scores_out=f"{tmp}/official_fp64.safetensors")
        exact = f"{tmp}/official_fp64.safetensors"
        diff, _ = kept_set_difference(f"{tmp}/ours.safetensors", exact, "smollm2")
        print(f"  kept sets at ratio 0.2, hfprune vs the released loop run in float64: {diff} neurons differ "
              f"(target: identical: {'OK' if diff == 0 else 'MISSED'})")
        median, p99 = score_error(f"{tmp}/ours.safetensors", exact)
        print(f"  hfprune's score error vs float64: median {median:.1e}, 99th percentile {p99:.1e} (relative)")
        for name, label in (("official_fp32", "fp32 accumulation"), ("official", "bf16 accumulation, as released")):
            diff, farthest = kept_set_difference(f"{tmp}/{name}.safetensors", exact, "smollm2")
            median, p99 = score_error(f"{tmp}/{name}.safetensors", exact)
            print(f"  the released loop with {label} vs float64: score error median {median:.1e}, 99th percentile "
                  f"{p99:.1e}; {diff} neurons differ"
                  + (f", all within {farthest:.1e} of their layer's cut (relative)" if diff else ""))
            diff, _ = kept_set_difference(f"{tmp}/ours.safetensors", f"{tmp}/{name}.safetensors", "smollm2")
            print(f"  hfprune vs the released loop with {label}: {diff} neurons differ")
    if "b" in only:
        print("(b) SmolLM2 taylor_ce + taylor_entropy: one shared forward vs apart")
        shared = m("taylor_ce+taylor_entropy")
        apart = m("taylor_ce")["seconds"] + m("taylor_entropy")["seconds"]
        verdict("time, shared / apart", shared["seconds"] / apart, 0.8)
    if "c" in only:
        print("(c) Qwen2.5-Coder-0.5B, long sequences: peak memory")
        ours, off = m("taylor_entropy", "qwen"), m("official", "qwen")
        verdict("peak memory, hfprune / official", ours["peak_mb"] / off["peak_mb"], 0.6)
        print(f"  time, hfprune / official: {ours['seconds'] / off['seconds']:.3f}x")
    if "d" in only:
        print("(d) SmolLM2 taylor_kd (CE pre-prune included) vs taylor_entropy")
        kd, ent = m("taylor_kd"), m("taylor_entropy")
        print(f"  time {kd['seconds'] / ent['seconds']:.2f}x, peak memory {kd['peak_mb'] / ent['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
