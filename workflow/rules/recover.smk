# Optional LoRA recovery (config recovery.enabled): a recovered cell depends on its plan only.


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
    threads: 4
    resources:
        gpu=gpus("recover"),
        mem_mb=32000,
        runtime=720,
    shell:
        GPU_JOB + " recover --config {params.config} --model {wildcards.model} --plan {input.plan} "
        "--out {output} > {log} 2>&1"
