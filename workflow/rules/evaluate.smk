# One metrics JSON per cell: the dense model once per model, each pruned plan, each recovered model.

EVAL_SETTINGS = settings("evaluation", *COMPUTE)


rule evaluate_dense:
    conda:
        ENV
    input:
        asset=asset_marker,
    output:
        f"{EXP}/metrics/{{model}}/dense.json",
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
        "--out {output} > {log} 2>&1"


rule evaluate_pruned:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=plan_path("{model}", "{criterion}", "{ratio}"),
    output:
        f"{EXP}/metrics/{{model}}/{{criterion}}/r{{ratio}}.json",
    log:
        f"{LOGS}/evaluate/{{model}}/{{criterion}}/r{{ratio}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/{{criterion}}/r{{ratio}}.tsv"
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
        "--out {output} > {log} 2>&1"


rule evaluate_recovered:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=plan_path("{model}", "{criterion}", "{ratio}"),
        recovered=rules.recover.output[0],
    output:
        f"{EXP}/metrics/{{model}}/{{criterion}}/r{{ratio}}.recovered.json",
    log:
        f"{LOGS}/evaluate/{{model}}/{{criterion}}/r{{ratio}}.recovered.log",
    benchmark:
        f"{BENCH}/evaluate/{{model}}/{{criterion}}/r{{ratio}}.recovered.tsv"
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
        "--recovered {input.recovered} --out {output} > {log} 2>&1"
