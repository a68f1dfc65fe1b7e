# Embedded (packaged GGUF) models -> safetensors folders under <resources_dir>/models/<name>/, once.


rule assets:
    output:
        f"{config['resources_dir']}/models/{{model}}/{ASSET_MARKER}",
    log:
        f"{LOGS}/assets/{{model}}.log",
    benchmark:
        f"{BENCH}/assets/{{model}}.tsv"
    params:
        hfprune=HFPRUNE,
        config=RUN_CONFIG,
        settings=settings(),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "{params.hfprune} assets --config {params.config} --model {wildcards.model} > {log} 2>&1"
