# One metrics JSON + per-unit records (Parquet) per cell: the dense model once per model, each pruned plan,
# each recovered model.

EVAL_SETTINGS = settings(*grid.READS["evaluate"])


rule evaluate_dense:
    conda:
        ENV
    input:
        asset=asset_marker,
    output:
        **with_records(layout.dense_metrics(EXP, "{v}", "{model}")),
    log:
        f"{LOGS}/evaluate/{{v}}{{model}}/dense.log",
    benchmark:
        f"{BENCH}/evaluate/{{v}}{{model}}/dense.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=job_config,
        settings=EVAL_SETTINGS,
    threads: job_threads()
    resources:
        gpu=gpus("evaluate"),
        mem_mb=16000,
        runtime=240,
    shell:
        GPU_JOB + " evaluate --config {params.config} --model {wildcards.model} "
        "--out {output.metrics} > {log} 2>&1"


rule evaluate_pruned:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=cell_plan,
    output:
        **with_records(layout.cell_metrics(EXP, "{v}", "{model}", "{criterion}", "{seed}", "{ratio}")),
    log:
        f"{LOGS}/evaluate/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=job_config,
        settings=EVAL_SETTINGS,
    threads: job_threads()
    resources:
        gpu=gpus("evaluate"),
        mem_mb=16000,
        runtime=240,
    shell:
        GPU_JOB + " evaluate --config {params.config} --model {wildcards.model} --plan {input.plan} "
        "--out {output.metrics} > {log} 2>&1"


rule evaluate_recovered:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=cell_plan,
        recovered=cell_recovered,
    output:
        **with_records(layout.cell_metrics(EXP, "{v}", "{model}", "{criterion}", "{seed}", "{ratio}", recovered=True)),
    log:
        f"{LOGS}/evaluate/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.recovered.log",
    benchmark:
        f"{BENCH}/evaluate/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.recovered.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=job_config,
        settings=EVAL_SETTINGS,
    threads: job_threads()
    resources:
        gpu=gpus("evaluate"),
        mem_mb=16000,
        runtime=240,
    shell:
        GPU_JOB + " evaluate --config {params.config} --model {wildcards.model} --plan {input.plan} "
        "--recovered {input.recovered} --out {output.metrics} > {log} 2>&1"
