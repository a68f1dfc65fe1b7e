"""`make gpu-check`: does the GPU path compute what the CPU path computes? One line per check, with its figure and
threshold; exit status 1 if any check fails. At most ~10 minutes on one GPU with the defaults.

On CUDA: the environment; the scorer in bf16 on CUDA against CPU fp32 (8x128 tokens; kept-set overlap at ratio
0.2 >= 0.98 and Spearman >= 0.99 per layer, run twice); the shared lm-eval backend against stock HFLM on offline7
(fp32: |dll| <= 1e-3 and equal accuracies; bf16: accuracies within 1 doc per task); 3 LoRA recovery steps on
packed against unpacked rows (per-example loss |d| <= 1e-2); efficiency, dense against 0.4-pruned (flagged, not
failed, when decode is >= 0.95x dense); the rehearsal workflow with --resources gpu=1 (every job's device is
cuda); two-slot GPU locking; with two or more GPUs, one model split over two GPUs through the backend and scorer.
On a machine without CUDA the checks that make sense on CPU run on CPU (the scorer against an fp64 reference)
and every CUDA-only check is named as skipped. tests/test_gpu_check.py runs it that way with small settings.

    .venv/bin/python scripts/gpu_check.py [--limit 20 --batches 8 --seq-len 128 ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hfprune.models import ModelSpec, load_model

MODEL = ModelSpec("smollm2-135m", "llama", "smollm2-135m")


class Report:
    def __init__(self):
        self.failed, self.skipped, self.flagged, self.passed = [], [], [], []

    def check(self, name: str, ok: bool, figure: str, threshold: str, flag: bool = False) -> None:
        status = "FAIL" if not ok else "FLAG" if flag else "PASS"
        (self.failed if not ok else self.flagged if flag else self.passed).append(name)
        print(f"[{status}] {name}: {figure} (threshold: {threshold})", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(name)
        print(f"[SKIP] {name}: {why}", flush=True)

    def run(self, name: str, fn, *args) -> None:
        """A check that raises fails with its one-line reason; the other checks still run."""
        try:
            fn(self, *args)
        except Exception as exc:  # noqa: BLE001 - any error is this check's failure, reported in one line
            self.check(name, False, f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", "runs")


def _model(args, dtype="float32", device="cpu", device_map=None):
    model, tok = load_model(MODEL, args.resources, dtype, device_map)
    return (model if device_map else model.to(device)), tok


# ---- checks ----------------------------------------------------------------------------------------------------
def cuda_environment(rep: Report) -> None:
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception as exc:  # noqa: BLE001 - NVML is optional here: torch still names the devices
        driver = f"unknown (NVML: {type(exc).__name__})"
    names = ", ".join(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB" for i, p in enumerate(props))
    rep.check("cuda-environment", bool(props), f"torch {torch.__version__}, CUDA {torch.version.cuda}, driver "
              f"{driver}; {names}", ">= 1 CUDA device")


def _calibration(tok, args) -> list[dict]:
    from hfprune.data import load_texts, text_source
    from hfprune.scorer import calibration_batches
    from hfprune.windows import sample_windows

    tokens = sample_windows(tok, load_texts(text_source("wiki")), args.batches, args.seq_len, 0)
    return calibration_batches(tokens, max(1, args.batches // 2))


def _agreement(ref: dict, got: dict) -> tuple[float, float]:
    """(smallest kept-set overlap at ratio 0.2, smallest Spearman) over the layers."""
    from scipy.stats import spearmanr

    overlaps, rhos = [], []
    for key, r in ref.items():
        g = got[key].double().cpu()
        k = round(0.8 * len(r))
        keep_r, keep_g = set(r.topk(k).indices.tolist()), set(g.topk(k).indices.tolist())
        overlaps.append(len(keep_r & keep_g) / k)
        rhos.append(float(spearmanr(r.numpy(), g.numpy())[0]))
    return min(overlaps), min(rhos)


def scorer(rep: Report, args, cuda: bool) -> None:
    from hfprune.scorer import score_model

    name = "scorer-cuda-bf16-vs-cpu-fp32" if cuda else "scorer-cpu-fp32-vs-fp64"
    model, tok = _model(args)
    batches = _calibration(tok, args)
    reference = (model if cuda else copy.deepcopy(model).double())
    ref = {k: v.double() for k, v in score_model(reference, batches, [args.criterion])[args.criterion].items()}
    del reference
    if cuda:
        model = model.to(torch.bfloat16).to("cuda")
    runs = [score_model(model, batches, [args.criterion])[args.criterion] for _ in range(2)]
    overlap, rho = (min(x) for x in zip(*(_agreement(ref, r) for r in runs)))
    diff = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(runs[0].values(), runs[1].values()))
    rep.check(name, overlap >= 0.98 and rho >= 0.99, f"{args.criterion}, {args.batches}x{args.seq_len} tokens: "
              f"kept-set overlap at 0.2 min {overlap:.4f}, Spearman min {rho:.4f}; largest relative difference "
              f"between two runs {diff:.2e}", "overlap >= 0.98, Spearman >= 0.99 per layer")


def _suite(model, tok, args, backend: str):
    from hfprune.evaluation.runner import evaluate_tasks, select_tasks
    from hfprune.runtime import quiet_lm_eval_git
    from hfprune.tasks import resolve_suite

    tasks = args.tasks.split(",") if args.tasks else None
    selection = select_tasks(resolve_suite("offline7", tasks), args.limit, 11, backend=backend)
    with quiet_lm_eval_git():
        tasks, _, res = evaluate_tasks(model, tok, selection, batch_size=4, log_samples=True)
    lls = {(task, s["doc_id"]): [r[0][0] for r in s["resps"]] for task, rows in res["samples"].items() for s in rows}
    return {t: (r["value"], r["n"]) for t, r in tasks.items()}, lls


def backend(rep: Report, args, device: str, dtype: str) -> None:
    model, tok = _model(args, dtype, device)
    (acc_s, ll_s), (acc_h, ll_h) = _suite(model, tok, args, "shared"), _suite(model, tok, args, "stock")
    dll = max(abs(a - b) for k in ll_h for a, b in zip(ll_s[k], ll_h[k], strict=True))
    docs = max(abs(acc_s[t][0] - acc_h[t][0]) * acc_h[t][1] for t in acc_h)
    name = f"backend-vs-hflm-{'fp32' if dtype == 'float32' else 'bf16'}"
    where = f"offline7{' ' + args.tasks if args.tasks else ''} limit {args.limit} on {device}"
    if dtype == "float32":
        rep.check(name, dll <= 1e-3 and docs < 0.5, f"{where}: max |dll| {dll:.2e}, "
                  f"largest accuracy difference {docs:.0f} docs", "|dll| <= 1e-3, equal accuracies")
    else:
        rep.check(name, docs <= 1 + 1e-9, f"{where}: largest accuracy difference "
                  f"{docs:.0f} docs per task (max |dll| {dll:.2e})", "<= 1 doc per task")


def recovery(rep: Report, args, device: str) -> None:
    from hfprune.data import load_texts, text_source
    from hfprune.recovery import training_precision
    from hfprune.recovery_data import collate, pack
    from hfprune.recovery_train import token_losses, train_lora
    from hfprune.validation import validate_config

    model, tok = _model(args)
    cfg = validate_config({"models": [{"name": "m", "source": "smollm2-135m"}], "criteria": ["magnitude"],
                           "ratios": [0.2], "device": device})
    rcfg = copy.deepcopy(cfg["recovery"])
    rcfg["lora"]["dropout"] = 0.0
    rcfg.update(warmup_steps=0, grad_accum=1)
    texts = [t for t in load_texts(text_source("wiki")) if len(t) > 200][:args.recovery_examples]
    examples = [(ids, ids) for ids in (tok(t)["input_ids"][:48] for t in texts)]
    _, autocast = training_precision(cfg, torch.device(device))
    losses = []
    for rows in (pack(examples, 4 * 48), [[ex] for ex in examples]):  # packed, then one example per row
        rcfg["batch_size"] = len(rows)  # every step sees every example: the two runs take the same steps
        peft, _ = train_lora(copy.deepcopy(model), rows, rcfg, steps=args.recovery_steps, seed=0,
                             pad_id=tok.pad_token_id, device=device, autocast_dtype=autocast)
        per_example = []
        with torch.no_grad(), torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            batch = {k: v.to(device) for k, v in collate(rows, tok.pad_token_id).items()}
            loss = token_losses(peft, batch)
            seg, labelled = batch["segments"][:, 1:], batch["labels"][:, 1:] != -100
            for r, row in enumerate(rows):
                for k in range(len(row)):
                    sel = (seg[r] == k) & labelled[r]
                    per_example.append(float(loss[r][sel].mean()))
        losses.append(per_example)
    diff = max(abs(a - b) for a, b in zip(*losses, strict=True))
    rep.check("recovery-packed-vs-unpacked", diff <= 1e-2, f"{args.recovery_steps} LoRA steps on {device}, "
              f"{len(examples)} examples: max per-example loss |d| {diff:.2e}", "<= 1e-2")


def efficiency(rep: Report, args, device: str) -> None:
    from hfprune.evaluation.efficiency import efficiency as measure
    from hfprune.plan import make_plan
    from hfprune.surgery import prune_model

    dtype = "bfloat16" if device == "cuda" else "float32"
    dense, _ = _model(args, dtype, device)
    gen = torch.Generator().manual_seed(0)
    cfg = dense.config
    scores = {f"mlp.{i}": torch.rand(cfg.intermediate_size, generator=gen) for i in range(cfg.num_hidden_layers)}
    pruned = prune_model(copy.deepcopy(dense), make_plan(scores, cfg, 0.4, "llama"))
    eff = measure(dense, pruned, repeats=args.efficiency_repeats, decode_tokens=args.decode_tokens)
    key = "decode_static_tok_s_ratio" if "decode_static_tok_s_ratio" in eff else "decode_tok_s_ratio"
    figure = (f"{dtype} on {device}: prefill {eff['prefill_ms_ratio']:.3f}x dense time, decode eager "
              f"{eff['decode_tok_s_ratio']:.3f}x dense rate"
              + (f", static cache + CUDA graphs {eff['decode_static_tok_s_ratio']:.3f}x ("
                 f"{eff['dense']['decode_static_tok_s']:.0f} vs eager {eff['dense']['decode_tok_s']:.0f} dense tok/s)"
                 if key != "decode_tok_s_ratio" else ""))
    # flagged when pruned decode takes >= 0.95x the dense time: a rate ratio (pruned / dense) <= 1 / 0.95
    rep.check("efficiency-dense-vs-0.4-pruned", True, figure, f"flagged when decode time >= 0.95x dense ({key} "
              f"<= {1 / 0.95:.3f})", flag=eff[key] <= 1 / 0.95)


def rehearsal(rep: Report, args) -> None:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "snakemake", "--cores", "4", "--resources", "gpu=1", "--configfile",
               "config/rehearsal.yaml", "--workflow-profile", "profiles/local", "--config", f"results_dir={tmp}",
               "device=cuda"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.workflow_timeout,
                              check=False)
        if proc.returncode:
            raise RuntimeError(f"snakemake exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        devices = {}
        for path in Path(tmp).rglob("*.json"):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "device" in (data.get("meta") or data):
                devices[str(path.relative_to(tmp))] = (data.get("meta") or data)["device"]
        bad = {p: d for p, d in devices.items() if not str(d).startswith("cuda")}
        rep.check("rehearsal-workflow-cuda", bool(devices) and not bad, f"{len(devices)} jobs' device fields, "
                  f"not cuda: {bad or 'none'}", "every job's device is cuda")


def slot_locking(rep: Report) -> None:
    job = "import os, time; print(os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True); time.sleep(2)"
    with tempfile.TemporaryDirectory() as lock_dir:
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        env.update(HFPRUNE_NUM_GPUS="2", HFPRUNE_GPU_LOCK_DIR=lock_dir, PYTHONPATH=str(ROOT))
        start = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "hfprune.gpu", "--", sys.executable, "-c", job], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(3)]
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
        seconds = time.monotonic() - start
    # two slots: two jobs run at once on different devices; the third waits for one of them
    ok = set(outs) == {"0", "1"} and all(p.returncode == 0 for p in procs) and seconds >= 4
    rep.check("gpu-slot-locking", ok, f"3 jobs on 2 slots got devices {outs} in {seconds:.1f} s",
              "devices {0, 1}, the third job waits (>= 4 s)")


def split_model(rep: Report, args) -> None:
    from lm_eval.models.huggingface import HFLM

    from hfprune.evaluation.backend import SharedContextLM
    from hfprune.scorer import score_model

    n = load_model(MODEL, args.resources)[0].config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                  **{f"model.layers.{i}": int(i >= n // 2) for i in range(n)}}
    model, tok = _model(args, device_map=device_map)
    ref_model, _ = _model(args)
    batches = _calibration(tok, args)
    ref = {k: v.double() for k, v in score_model(ref_model, batches, [args.criterion])[args.criterion].items()}
    overlap, rho = _agreement(ref, score_model(model, batches, [args.criterion])[args.criterion])
    text = tok("The quick brown fox jumps over the lazy dog. " * 3)["input_ids"]
    reqs = [((str(i), str(i)), text[:10 + i], text[10 + i:14 + i]) for i in range(8)]
    got = SharedContextLM(pretrained=model, tokenizer=tok, batch_size=4)._loglikelihood_tokens(reqs, True)
    want = HFLM(pretrained=ref_model, tokenizer=tok, batch_size=4)._loglikelihood_tokens(reqs, True)
    dll = max(abs(a[0] - b[0]) for a, b in zip(got, want, strict=True))
    rep.check("split-model-two-gpus", overlap >= 0.98 and rho >= 0.99 and dll <= 1e-3,
              f"layers over cuda:0/cuda:1: scorer overlap {overlap:.4f}, Spearman {rho:.4f}; backend max |dll| "
              f"{dll:.2e} against CPU HFLM", "overlap >= 0.98, Spearman >= 0.99, |dll| <= 1e-3")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", default=str(ROOT / "resources"), help="where embedded models live")
    parser.add_argument("--criterion", default="taylor_ce")
    parser.add_argument("--batches", type=int, default=8, help="calibration sequences of the scorer checks")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--limit", type=int, default=20, help="docs per offline7 task of the backend checks")
    parser.add_argument("--tasks", default=None, help="comma-separated offline7 tasks (default: all seven)")
    parser.add_argument("--recovery-examples", type=int, default=8)
    parser.add_argument("--recovery-steps", type=int, default=3)
    parser.add_argument("--efficiency-repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--workflow-timeout", type=int, default=300, help="seconds for the rehearsal workflow")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    device = "cuda" if cuda else "cpu"
    rep = Report()
    print(f"gpu-check: torch {torch.__version__}, {gpus} CUDA device(s); checks run on {device}", flush=True)
    no_cuda = "no CUDA device (CUDA-only check)"
    if cuda:
        rep.run("cuda-environment", cuda_environment)
    else:
        rep.skip("cuda-environment", no_cuda)
    rep.run("scorer", scorer, args, cuda)
    if cuda:
        rep.skip("scorer-cpu-fp32-vs-fp64", "CUDA present: the bf16-on-CUDA check runs instead")
    else:
        rep.skip("scorer-cuda-bf16-vs-cpu-fp32", no_cuda)
    rep.run("backend-vs-hflm-fp32", backend, args, device, "float32")
    if cuda:
        rep.run("backend-vs-hflm-bf16", backend, args, device, "bfloat16")
    else:
        rep.skip("backend-vs-hflm-bf16", no_cuda)
    rep.run("recovery-packed-vs-unpacked", recovery, args, device)
    rep.run("efficiency-dense-vs-0.4-pruned", efficiency, args, device)
    if cuda:
        rep.run("rehearsal-workflow-cuda", rehearsal, args)
    else:
        rep.skip("rehearsal-workflow-cuda", no_cuda)
    rep.run("gpu-slot-locking", slot_locking)
    if gpus >= 2:
        rep.run("split-model-two-gpus", split_model, args)
    else:
        rep.skip("split-model-two-gpus", f"needs 2 CUDA devices, {gpus} here")
    print(f"gpu-check: {len(rep.passed)} passed, {len(rep.flagged)} flagged, {len(rep.failed)} failed; "
          f"skipped: {', '.join(rep.skipped) or 'none'}", flush=True)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
