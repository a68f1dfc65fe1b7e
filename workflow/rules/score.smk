# Neuron scores once per model x criterion x calibration seed (every ratio reuses them). Random and magnitude
# need no calibration data but are jobs all the same, so every criterion has the same outputs; magnitude is
# scored for the first seed only (hfprune.config.cell_seeds). A criterion with per-ratio options
# (criterion_options.<c>.by_ratio, e.g. SDMPrune's alpha/temperature per ratio) is scored once per ratio instead,
# by rule score_by_ratio (s<seed>.r<ratio>; the seed wildcard is digits only, so the two never match the same file).


rule score:
    conda:
        ENV
    input:
        asset=asset_marker,
    output:
        scores=layout.score_file(EXP, "{v}", "{model}", "{criterion}", "{seed}"),
        meta=layout.score_file(EXP, "{v}", "{model}", "{criterion}", "{seed}", suffix=".json"),
    log:
        f"{LOGS}/score/{{v}}{{model}}/{{criterion}}/s{{seed}}.log",
    benchmark:
        f"{BENCH}/score/{{v}}{{model}}/{{criterion}}/s{{seed}}.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=job_config,
        settings=settings(*grid.READS["score"]),
    threads: job_threads()
    resources:
        gpu=gpus("score"),
        mem_mb=16000,
        runtime=120,
    shell:
        GPU_JOB + " score --config {params.config} --model {wildcards.model} "
        "--criterion {wildcards.criterion} --seed {wildcards.seed} --out {output.scores} > {log} 2>&1"



rule score_by_ratio:
    conda:
        ENV
    input:
        asset=asset_marker,
    output:
        scores=layout.score_file(EXP, "{v}", "{model}", "{criterion}", "{seed}", "{ratio}"),
        meta=layout.score_file(EXP, "{v}", "{model}", "{criterion}", "{seed}", "{ratio}", ".json"),
    log:
        f"{LOGS}/score/{{v}}{{model}}/{{criterion}}/s{{seed}}.r{{ratio}}.log",
    benchmark:
        f"{BENCH}/score/{{v}}{{model}}/{{criterion}}/s{{seed}}.r{{ratio}}.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=job_config,
        settings=settings(*grid.READS["score"]),
    threads: job_threads()
    resources:
        gpu=gpus("score"),
        mem_mb=16000,
        runtime=120,
    shell:
        GPU_JOB + " score --config {params.config} --model {wildcards.model} "
        "--criterion {wildcards.criterion} --seed {wildcards.seed} --ratio {wildcards.ratio} "
        "--out {output.scores} > {log} 2>&1"
