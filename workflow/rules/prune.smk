# Scores + ratio -> plan (kept neuron indices per layer): cheap, CPU only, one per cell.


rule plan:
    conda:
        ENV
    input:
        asset=asset_marker,
        scores=plan_scores,
    output:
        plan_path("{model}", "{criterion}", "{seed}", "{ratio}"),
    log:
        f"{LOGS}/plan/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.log",
    benchmark:
        f"{BENCH}/plan/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.tsv"
    params:
        hfprune=HFPRUNE,
        config=RUN_CONFIG,
        settings=settings("pruning"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "{params.hfprune} plan --config {params.config} --model {wildcards.model} --scores {input.scores} "
        "--ratio {wildcards.ratio} --out {output} > {log} 2>&1"
