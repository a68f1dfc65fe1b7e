# Embedded (packaged GGUF) models -> safetensors folders under <resources_dir>/models/<source>/, once per
# packaged model (config entries that share a source share its folder).


rule assets:
    conda:
        ENV
    output:
        asset_output("{source}"),
    log:
        f"{LOGS}/assets/{{source}}.log",
    benchmark:
        f"{BENCH}/assets/{{source}}.tsv"
    params:
        hfprune=HFPRUNE,
        config=RUN_CONFIG,
        settings=settings(),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "{params.hfprune} assets --config {params.config} --source {wildcards.source} > {log} 2>&1"
