# Scores + ratio -> plan (kept neuron indices per layer): cheap, CPU only, one per cell.


rule plan:
    conda:
        ENV
    input:
        asset=asset_marker,
        scores=plan_scores,
    output:
        layout.plan_file(EXP, "{v}", "{model}", "{criterion}", "{seed}", "{ratio}"),
    log:
        f"{LOGS}/plan/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.log",
    benchmark:
        f"{BENCH}/plan/{{v}}{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.tsv"
    params:
        hfprune=HFPRUNE,
        config=job_config,
        settings=settings(*grid.READS["plan"]),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "{params.hfprune} plan --config {params.config} --model {wildcards.model} --scores {input.scores} "
        "--ratio {wildcards.ratio} --out {output} > {log} 2>&1"
