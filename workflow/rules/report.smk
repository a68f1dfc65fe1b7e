# Tables (markdown, CSV, LaTeX), plots and report.md of the experiment; needs every cell's metrics. The folder is
# also what `snakemake --report <experiment>/report.html` puts into Snakemake's self-contained HTML report.


rule report:
    conda:
        ENV
    input:
        report_inputs(),
    output:
        report(
            directory(REPORT),
            patterns=["report.md", "plots/{name}.png", "tables/{name}.csv"],
            caption="../report/report.rst",
            category="hfprune report",
        ),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    params:
        hfprune=HFPRUNE,
        config=RUN_CONFIG,
        settings=settings("report", "evaluation", "calibration", "recovery", "grid"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    shell:
        "{params.hfprune} report --config {params.config} --out-dir {output} --tracking > {log} 2>&1"
