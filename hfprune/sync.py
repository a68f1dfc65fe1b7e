"""The grid's finished jobs (its results folder) against the runs in its MLflow store.

A job is complete in the store when a FINISHED run carries its output key and its output's content hash
(tracking_store.OUTPUT_TAG / DIGEST_TAG, set by the job itself). `gaps` names every finished job without such a run
(the report's header, Snakemake's `onsuccess`/`onerror`, `hfprune validate C --tracking`); `sync` logs those
jobs from their files through the jobs' own logging code (params, metrics, per-unit records, plan, score and
recovery artifacts, start and end times from the outputs), completing the run a job left RUNNING when its store
failed, else creating one. A second `sync` finds nothing to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hfprune import grid, layout, tracking, tracking_store
from hfprune.config import cell_seeds, score_ratios, with_seed
from hfprune.errors import HFPruneError
from hfprune.plan import format_ratio
from hfprune.runtime import read_json


@dataclass(frozen=True)
class Job:
    """A tracked grid job: score (model x criterion x seed [x ratio]), recover or evaluate (a cell)."""

    stage: str
    model: str
    output: str
    cfg: dict = field(compare=False, repr=False)  # the config of the job's point, as the job reads it
    criterion: str | None = None
    plan: str | None = None
    recovered: bool = False


def grid_jobs(cfg: dict) -> list[Job]:
    """Every score, recover and evaluate job of the config (each variant's, shared ones once)."""
    exp = f"{cfg['results_dir']}/{cfg['experiment']}"
    points = grid.points(cfg)
    jobs: dict[str, Job] = {}

    def add(stage, model, output, point_dir, **kw):
        jobs.setdefault(output, Job(stage, model, output, points[grid.folder_name(point_dir)], **kw))

    for vcfg in grid.variants(cfg).values():
        for m in (e["name"] for e in vcfg["models"]):
            add("evaluate", m, layout.dense_metrics(exp, grid.variant_dir(vcfg, "evaluate_dense"), m),
                grid.variant_dir(vcfg, "evaluate_dense"))
            for c in vcfg["criteria"]:
                v = {chain: grid.variant_dir(vcfg, chain, c) for chain in grid.CHAINS}
                for s in cell_seeds(vcfg, m, c):
                    for r in score_ratios(vcfg, c):
                        out = layout.score_file(exp, v["score"], m, c, s, r)
                        jobs.setdefault(out, Job("score", m, out, with_seed(points[grid.folder_name(v["score"])], m, s),
                                                 criterion=c))
                    for r in map(format_ratio, vcfg["ratios"]):
                        plan = layout.plan_file(exp, v["plan"], m, c, s, r)
                        add("evaluate", m, layout.cell_metrics(exp, v["evaluate_pruned"], m, c, s, r),
                            v["evaluate_pruned"], criterion=c, plan=plan)
                        if vcfg["recovery"]["enabled"]:
                            add("recover", m, layout.recovered_dir(exp, v["recover"], m, c, s, r), v["recover"],
                                criterion=c, plan=plan, recovered=True)
                            add("evaluate", m, layout.cell_metrics(exp, v["evaluate_recovered"], m, c, s, r, True),
                                v["evaluate_recovered"], criterion=c, plan=plan, recovered=True)
    return list(jobs.values())


def finished(job: Job) -> bool:
    """Whether the job's output is complete on disk (outputs are written atomically, sidecars and records
    before the file that Snakemake waits for, except the score sidecar)."""
    out = Path(job.output)
    if job.stage == "recover":
        return (out / "recovery.json").is_file()
    if job.stage == "score":
        return out.is_file() and out.with_suffix(".json").is_file()
    return out.is_file()


def _store(cfg: dict) -> tuple[tracking_store.Store, str | None]:
    """The config's store (HFPruneError naming the URI if a server is unreachable) and the experiment id."""
    if not cfg["tracking"]["enabled"]:
        raise HFPruneError("tracking.enabled is false in this config: there is no MLflow store to check")
    store = tracking_store.Store(tracking_store.tracking_uri(cfg))
    exp = store.call("get_experiment_by_name", cfg["experiment"])
    return store, None if exp is None else exp.experiment_id


def _job_runs(store: tracking_store.Store, exp_id: str | None) -> dict[str, list]:
    """Job runs of the experiment by output key, newest first."""
    if exp_id is None:
        return {}
    runs, token = [], None
    while True:
        page = store.call("search_runs", [exp_id], filter_string=f"tags.`{tracking_store.ROLE_TAG}` = 'job'",
                          max_results=10_000, order_by=["attributes.start_time DESC"], page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    out: dict[str, list] = {}
    for run in runs:
        if tracking_store.OUTPUT_TAG in run.data.tags:
            out.setdefault(run.data.tags[tracking_store.OUTPUT_TAG], []).append(run)
    return out


def _state(job: Job, runs: list) -> str | None:
    """None if a FINISHED run holds the job's current output, else what the store has instead."""
    digest = tracking_store.output_digest(job.output)
    if any(r.info.status == "FINISHED" and r.data.tags.get(tracking_store.DIGEST_TAG) == digest for r in runs):
        return None
    if not runs:
        return "missing"
    latest = runs[0]
    if latest.info.status == "FINISHED":
        return "FINISHED for an older output"
    return latest.info.status + ("" if tracking_store.DIGEST_TAG in latest.data.tags else ", incomplete")


def gaps(cfg: dict) -> tuple[int, dict[str, str]]:
    """(finished jobs in the results folder, {output key: state} of those the store lacks)."""
    store, exp_id = _store(cfg)
    runs = _job_runs(store, exp_id)
    done = [j for j in grid_jobs(cfg) if finished(j)]
    out = {}
    for job in done:
        key = tracking_store.output_key(job.cfg, job.output)
        state = _state(job, runs.get(key, []))
        if state is not None:
            out[key] = state
    return len(done), out


def summary(cfg: dict, source: str = "C") -> tuple[bool, str]:
    """(complete, one line) for the report, Snakemake's output and `validate --tracking`."""
    n, missing = gaps(cfg)
    uri = tracking_store.tracking_uri(cfg)
    if not missing:
        return True, f"MLflow store {uri}: complete ({n} finished job(s), each with a FINISHED run)"
    listed = "; ".join(f"{key} ({state})" for key, state in missing.items())
    return False, (f"MLflow store {uri}: INCOMPLETE, {len(missing)} of {n} finished job(s) have no FINISHED run: "
                   f"{listed}; run `hfprune sync --config {source}` to log them from the results folder")


def _times(job: Job) -> dict:
    """The job's own start and end (ms) from its outputs: the output's modification time, less the compute
    seconds the output records."""
    out = Path(job.output)
    if job.stage == "score":
        meta, files = read_json(out.with_suffix(".json"), "score sidecar"), [out, out.with_suffix(".json")]
        seconds = meta.get("seconds") or 0
    elif job.stage == "recover":
        files = [out / "recovery.json"]
        seconds = read_json(files[0], "recovery.json").get("seconds") or 0
    else:
        files = [out]
        seconds = sum(((read_json(out, "metrics file").get("meta") or {}).get("seconds") or {}).values())
    end = max(os.path.getmtime(f) for f in files)
    return {"start": int((end - seconds) * 1000), "end": int(end * 1000)}


def _log(job: Job, backfill: dict) -> None:
    """Log one finished job from its files, as its command would have."""
    if job.stage == "score":
        with tracking.stage_run(job.cfg, model=job.model, stage="score", criterion=job.criterion,
                                output=job.output, backfill=backfill) as run:
            tracking.log_scores(run, job.output)
        return
    with tracking.cell_run(job.cfg, job.model, job.stage, job.plan, recovered=job.recovered, output=job.output,
                           backfill=backfill) as run:
        if job.stage == "recover":
            tracking.log_recovery(run, read_json(Path(job.output) / "recovery.json", "recovery.json"), job.output)
        else:
            tracking.log_cell_metrics(run, read_json(job.output, "metrics file"), job.output)


def sync(cfg: dict) -> list[str]:
    """Log every finished job the store lacks; returns their output keys."""
    exp = Path(cfg["results_dir"]) / cfg["experiment"]
    if not exp.is_dir():
        raise HFPruneError(f"results folder {str(exp)!r} does not exist: nothing to sync (check results_dir and "
                           "experiment, or run the grid first)")
    store, exp_id = _store(cfg)
    runs = _job_runs(store, exp_id)
    logged = []
    for job in (j for j in grid_jobs(cfg) if finished(j)):
        key = tracking_store.output_key(job.cfg, job.output)
        have = runs.get(key, [])
        if _state(job, have) is None:
            continue
        # the run its job left RUNNING when the store failed mid-job (no digest yet) is completed, not doubled
        resume = next((r.info.run_id for r in have if r.info.status == "RUNNING"
                       and tracking_store.DIGEST_TAG not in r.data.tags), None)
        _log(job, {**_times(job), "resume": resume})
        logged.append(key)
    return logged


def log_report(cfg: dict, report_dir: str | os.PathLike) -> None:
    """The report and each model's verdict tables as artifacts of the model's parent run (report job)."""
    store, exp_id = _store(cfg)
    if exp_id is None:
        return
    root = Path(report_dir)
    for entry in cfg["models"]:
        found = store.call("search_runs", [exp_id], max_results=1,
                           filter_string=f"tags.`{tracking_store.ROLE_TAG}` = 'parent' and "
                                         f"tags.`{tracking_store.MODEL_TAG}` = '{entry['name']}'")
        if not found:
            continue
        run_id = found[0].info.run_id
        store.call("log_artifact", run_id, str(root / "report.md"), "report")
        for table in sorted(root.glob(f"tables/**/{entry['name']}.verdict.*")):
            store.call("log_artifact", run_id, str(table), str(Path("report") / table.parent.relative_to(root)))


def report_notes(cfg: dict, source: str) -> tuple[list[str], bool]:
    """The report job's tracking step: `sync` when the store is reachable, then the completeness line for the
    report's header; (markdown lines, whether the store could be reached)."""
    if not cfg["tracking"]["enabled"]:
        return [], False
    try:
        logged = sync(cfg)
        complete, line = summary(cfg, source)
    except Exception as exc:  # noqa: BLE001 - an unreachable server, a damaged file: named, never a failure
        return [f"**MLflow tracking not checked:** {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                ""], False
    lines = [f"{'' if complete else '**'}{line}{'' if complete else '**'}"]
    if logged:
        lines[0] += f" ({len(logged)} job(s) logged by `hfprune sync` in this report job)"
    return lines + [""], True
