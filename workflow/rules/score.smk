# Neuron scores once per model x criterion (every ratio reuses them). Random and magnitude need no
# calibration data but are jobs all the same, so every criterion has the same outputs.


rule score:
    conda:
        ENV
    input:
        asset=asset_marker,
    output:
        scores=score_path("{model}", "{criterion}"),
        meta=f"{EXP}/scores/{{model}}/{{criterion}}.json",
    log:
        f"{LOGS}/score/{{model}}/{{criterion}}.log",
    benchmark:
        f"{BENCH}/score/{{model}}/{{criterion}}.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=RUN_CONFIG,
        settings=settings("calibration", "scoring", "pruning.scope", *COMPUTE),
    threads: 4
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=120,
    shell:
        "{params.hfprune} score --config {params.config} --model {wildcards.model} "
        "--criterion {wildcards.criterion} --out {output.scores} > {log} 2>&1"
