"""Process overhead of the grid's jobs: how much of each job's wall time is its timed compute (issue 27).

Runs a slice of config/default.yaml through Snakemake in a temporary folder: one model, one criterion, one ratio,
the first calibration seed, the dense row, the default's evaluation settings and tracking (MLflow, SQLite). Then,
from Snakemake's benchmark files (each job's wall time, process start to exit) and the jobs' own timings (an
evaluate job's metrics JSON `meta.timing.stages`, or `meta.seconds` from before that existed; a score sidecar's
`timing.stages`, or its `seconds`; the report's own timing line in its log), prints per stage

    overhead ratio = sum of job wall time / sum of timed compute stages

and overall (every job's wall time, plan jobs included, over every timed stage; the one-off `assets` model
conversion left out), plus where an evaluate job's
remaining seconds go (`meta.timing`: imports, set-up, tracking) and the report's own time. Targets: evaluate
<= 1.3x, report <= 5 s. The last line is `grid overhead X.XXx (evaluate Y.YYx, report Z.Z s)`.

    python benchmarks/bench_grid.py                       # the slice (~3 min on 2 cores), SmolLM2 / taylor_ce / 0.2
    python benchmarks/bench_grid.py --criterion magnitude --keep /tmp/grid   # keep the run's folder
    python benchmarks/bench_grid.py --from-results results/default           # a finished grid's figures

Timings on a shared machine are noisy: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# `hfprune report` prints this line (hfprune.commands.report)
REPORT_LINE = re.compile(r"^report timing: ([\d.]+) s", re.MULTILINE)


def slice_config(model: str, criterion: str, ratio: float, seeds: int, results: Path) -> dict:
    cfg = yaml.safe_load((ROOT / "config/default.yaml").read_text())
    entry = next((m for m in cfg["models"] if m["name"] == model), None)
    if entry is None:
        sys.exit(f"model {model!r} is not in config/default.yaml")
    entry = dict(entry)
    cfg["calibration"]["seeds"] = list(entry.pop("seeds", None) or cfg["calibration"]["seeds"])[:seeds]
    cfg.update(experiment="bench_grid", results_dir=str(results), resources_dir=str(ROOT / "resources"),
               models=[entry], criteria=[criterion], ratios=[ratio])
    cfg["tracking"]["uri"] = f"sqlite:///{results}/mlflow.db"
    return cfg


def run_slice(args) -> Path:
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_grid-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = slice_config(args.model, args.criterion, args.ratio, args.seeds, work / "results")
    config = work / "bench_grid.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", str(args.cores), "--configfile", str(config), "--workflow-profile",
           str(ROOT / "profiles/local"), "--quiet", "rules"]
    print(f"running the slice in {work}: {args.model} / {args.criterion} / r{args.ratio} "
          f"(+ dense), seeds {cfg['calibration']['seeds']}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"snakemake: {seconds:.1f} s in all (DAG, scheduling and the jobs)")
    return work / "results" / cfg["experiment"]


def _wall(tsv: Path) -> float:
    with tsv.open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return sum(float(r["s"]) for r in rows) / len(rows)  # `benchmark: repeat(...)` writes one row per repeat


def _stages(meta: dict | None, fallback: str) -> dict[str, float]:
    meta = meta or {}
    timing = meta.get("timing") or {}
    if timing.get("stages"):
        return {k: float(v) for k, v in timing["stages"].items()}
    value = meta.get(fallback)
    return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else (
        {"score": float(value)} if value is not None else {})


def job_timings(exp: Path) -> list[dict]:
    """One row per job that has a benchmark file: stage, wall, its timed compute stages and its own timing."""
    jobs = []
    bench = exp / "benchmarks"
    for tsv in sorted(bench.rglob("*.tsv")):
        rel = tsv.relative_to(bench)
        if len(rel.parts) == 1:  # one job of its rule, e.g. report.tsv
            stage, rest = rel.stem, Path(rel.stem)
        else:
            stage, rest = rel.parts[0], Path(*rel.parts[1:]).with_suffix("")
        row = {"stage": stage, "job": str(rest), "wall": _wall(tsv), "stages": {}, "timing": {}}
        if stage == "evaluate":
            metrics = exp / "metrics" / f"{rest}.json"
            if metrics.is_file():
                meta = json.loads(metrics.read_text())["meta"]
                row["stages"], row["timing"] = _stages(meta, "seconds"), meta.get("timing") or {}
        elif stage == "score":
            sidecar = exp / "scores" / f"{rest}.json"
            if sidecar.is_file():
                meta = json.loads(sidecar.read_text())
                row["stages"], row["timing"] = _stages(meta, "seconds"), meta.get("timing") or {}
        elif stage == "recover":
            summary = exp / "recovered" / rest / "recovery.json"
            if summary.is_file():
                row["stages"] = {"recover": float(json.loads(summary.read_text()).get("seconds") or 0.0)}
        elif stage == "report":
            log = exp / "logs" / "report.log"
            found = REPORT_LINE.findall(log.read_text()) if log.is_file() else []
            row["stages"] = {"report": float(found[-1])} if found else {}
        jobs.append(row)
    if not jobs:
        sys.exit(f"no Snakemake benchmark files under {bench}")
    return jobs


def _ratio(wall: float, compute: float) -> str:
    return f"{wall / compute:.2f}x" if compute > 0 else "n/a"


def summarize(exp: Path) -> str:
    jobs = [j for j in job_timings(exp) if j["stage"] != "assets"]  # a one-off model conversion, not per grid
    by_stage = defaultdict(list)
    for job in jobs:
        by_stage[job["stage"]].append(job)
    print(f"\n{'stage':<10} {'jobs':>4} {'wall s':>8} {'timed s':>8} {'overhead':>9}")
    for stage, rows in by_stage.items():
        wall = sum(r["wall"] for r in rows)
        compute = sum(sum(r["stages"].values()) for r in rows)
        print(f"{stage:<10} {len(rows):>4} {wall:>8.1f} {compute:>8.1f} {_ratio(wall, compute):>9}")
    wall = sum(j["wall"] for j in jobs)
    compute = sum(sum(j["stages"].values()) for j in jobs)
    print(f"{'all':<10} {len(jobs):>4} {wall:>8.1f} {compute:>8.1f} {_ratio(wall, compute):>9}")

    for stage in ("evaluate", "score"):
        rows = by_stage.get(stage, [])
        print(f"\n{stage} jobs: wall, timed stages, and (where the job records it) the rest of its own timing")
        for r in rows:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
            own = r["timing"]
            extra = ", ".join(f"{k} {v:.1f}" for k, v in own.items() if isinstance(v, (int, float)))
            tail = f"; job's own: {extra}" if extra else ""
            print(f"  {r['job']}: wall {r['wall']:.1f} s = timed {sum(r['stages'].values()):.1f} ({stages}){tail}")
    evaluate = by_stage.get("evaluate", [])
    ev = _ratio(sum(r["wall"] for r in evaluate), sum(sum(r["stages"].values()) for r in evaluate))
    report = by_stage.get("report", [])
    if report and report[0]["stages"]:
        report_s = f"{report[0]['stages']['report']:.1f} s"
    elif report:
        report_s = f"{report[0]['wall']:.1f} s"
        print(f"\nreport: no timing line in its log (code before issue 27): the job's wall time, {report_s}, instead")
    else:
        report_s = "n/a"
    if report and report[0]["stages"]:
        print(f"\nreport: its own work {report_s} of {report[0]['wall']:.1f} s job wall time")
    return f"grid overhead {_ratio(wall, compute)} (evaluate {ev}, report {report_s})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-results", type=Path, help="a finished experiment folder (results/<experiment>)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--criterion", default="taylor_ce")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=1, help="calibration seeds of the slice (the model's first N)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", help="run in this folder and keep it (default: a new temporary folder)")
    args = parser.parse_args()
    exp = args.from_results if args.from_results else run_slice(args)
    print(summarize(exp))


if __name__ == "__main__":
    main()
