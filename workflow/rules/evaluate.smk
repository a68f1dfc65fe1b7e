# One metrics JSON + per-unit records (Parquet) per cell: the dense model once per model, each pruned plan,
# each recovered model.

EVAL_SETTINGS = settings("evaluation", *COMPUTE)


rule evaluate_dense:
    conda:
        ENV
    input:
        asset=asset_marker,
    output:
        metrics=f"{EXP}/metrics/{{model}}/dense.json",
        units=f"{EXP}/metrics/{{model}}/dense.units.parquet",
    log:
        f"{LOGS}/evaluate/{{model}}/dense.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/dense.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=RUN_CONFIG,
        settings=EVAL_SETTINGS,
    threads: 4
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=240,
    shell:
        "{params.hfprune} evaluate --config {params.config} --model {wildcards.model} "
        "--out {output.metrics} > {log} 2>&1"


rule evaluate_pruned:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=plan_path("{model}", "{criterion}", "{seed}", "{ratio}"),
    output:
        **cell_metrics("{model}", "{criterion}", "{seed}", "{ratio}"),
    log:
        f"{LOGS}/evaluate/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=RUN_CONFIG,
        settings=EVAL_SETTINGS,
    threads: 4
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=240,
    shell:
        "{params.hfprune} evaluate --config {params.config} --model {wildcards.model} --plan {input.plan} "
        "--out {output.metrics} > {log} 2>&1"


rule evaluate_recovered:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=plan_path("{model}", "{criterion}", "{seed}", "{ratio}"),
        recovered=rules.recover.output[0],
    output:
        **cell_metrics("{model}", "{criterion}", "{seed}", "{ratio}", recovered=True),
    log:
        f"{LOGS}/evaluate/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.recovered.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.recovered.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=RUN_CONFIG,
        settings=EVAL_SETTINGS,
    threads: 4
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=240,
    shell:
        "{params.hfprune} evaluate --config {params.config} --model {wildcards.model} --plan {input.plan} "
        "--recovered {input.recovered} --out {output.metrics} > {log} 2>&1"
