# Tables (markdown, CSV, LaTeX), plots and report.md of the experiment; needs every cell's metrics.


rule report:
    conda:
        ENV
    input:
        metrics=metrics_paths(),
        plans=[plan_path(m, c, s, r) for m, c, s in cells() for r in RATIOS],
        scores=score_sidecars(),
    output:
        REPORT,
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    params:
        hfprune=HFPRUNE,
        config=RUN_CONFIG,
        settings=settings("report", "evaluation", "calibration", "recovery"),
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    shell:
        "{params.hfprune} report --config {params.config} --out-dir {params.out_dir} > {log} 2>&1"
