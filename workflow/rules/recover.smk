# Optional LoRA recovery (config recovery.enabled): a recovered cell depends on its plan only.
# `hfprune recover` runs itself under torchrun when the job has several GPUs (resources.gpus_per_job of
# recover); threads and memory are per training process. A killed job's checkpoints survive under
# <results_dir>/<experiment>/checkpoints/ (outside the directory() output) and the retry resumes from them.

from hfprune.config import gpus_per_job


def recover_processes(wildcards):
    return max(1, gpus_per_job(point(wildcards), wildcards.model, "recover"))


rule recover:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=cell_plan,
    output:
        directory(layout.recovered_dir(EXP, "{v}", "{model}", "{criterion}", "{seed}", "{ratio}")),
    log:
        f"{LOGS}/recover/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.log",
    benchmark:
        f"{BENCH}/recover/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=job_config,
        settings=settings(*grid.READS["recover"]),
    # attempts: ceil(estimated hours / runtime hours) + 1; 3 for the paper grid's 7-8B jobs (docs/GPU.md)
    retries: 3
    threads: lambda wildcards: 4 * recover_processes(wildcards)
    resources:
        gpu=gpus("recover"),
        mem_mb=lambda wildcards: 32000 * recover_processes(wildcards),
        runtime=720,
    shell:
        GPU_JOB + " recover --config {params.config} --model {wildcards.model} --plan {input.plan} "
        "--out {output} > {log} 2>&1"
