"""hfprune experiment grid: models x criteria x ratios (x grid variants) -> score -> plan -> (recovery) -> evaluate
-> report.

Run from the repository root: `make run`, or
    snakemake --cores all --resources gpu=N --configfile CONFIG --workflow-profile profiles/local
(docs/WORKFLOW.md has the SLURM and MLflow commands). Every job is one `hfprune <command>` call
(docs/CONTRACTS.md: paths and file formats between stages).
"""

from hfprune.validation import check_models, validate_config
from hfprune.errors import HFPruneError, stop_workflow


# --configfile replaces the default instead of being merged into it (Snakemake's `configfile:` would merge
# them key by key, so a paper run could silently inherit the CPU grid's settings).
if not workflow.overwrite_configfiles:

    configfile: "config/default.yaml"


# Schema validation (defaults filled in, every grid variant too) before any job is scheduled: a bad field stops
# the run here, named.
_source = ", ".join(map(str, workflow.overwrite_configfiles)) or "config"
try:
    config.update(validate_config(config, source=_source))
    if workflow.is_main_process:  # model sources and ratios, from config.json facts (not again inside each job)
        check_models(config, source=_source)
except HFPruneError as e:
    stop_workflow(e)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/assets.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/recover.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        REPORT,
