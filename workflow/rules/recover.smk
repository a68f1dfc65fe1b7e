# Optional LoRA recovery (config recovery.enabled): a recovered cell depends on its plan only.


rule recover:
    conda:
        ENV
    input:
        asset=asset_marker,
        plan=plan_path("{model}", "{criterion}", "{seed}", "{ratio}"),
    output:
        directory(f"{EXP}/recovered/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}"),
    log:
        f"{LOGS}/recover/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.log",
    benchmark:
        f"{BENCH}/recover/{{model}}/{{criterion}}/s{{seed}}/r{{ratio}}.tsv"
    params:
        hfprune=HFPRUNE_GPU,
        config=RUN_CONFIG,
        settings=settings("recovery", *COMPUTE),
    threads: 4
    resources:
        gpu=GPU,
        mem_mb=32000,
        runtime=720,
    shell:
        "{params.hfprune} recover --config {params.config} --model {wildcards.model} --plan {input.plan} "
        "--out {output} > {log} 2>&1"
