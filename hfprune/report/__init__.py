"""The report of one experiment, verdicts first, from its metrics JSONs, per-unit records, plans and score sidecars.

`write_report(cfg)` writes ``<results_dir>/<experiment>/report/`` atomically (the whole folder at once):

- ``report.md``: first the **Verdicts** — per model x ratio (x recovered), every criterion against the baseline
  criterion (``report.baseline``, default the paper's CE) and against the dense model: paired differences with
  95 % CIs on log-perplexity, fidelity and (gold-choice probability, accuracy) task averages, Holm-corrected
  marks (equivalent / better / worse / undecided at ``report.margins``, hfprune.equivalence), each with its
  inference target, the interval over calibration draws beside it, the smallest difference the grid can detect and
  a power plan (hfprune.power); a forest plot and, with several calibration seeds, the marks per measure. Then the paper's
  table forms, every number a mean over calibration seeds with its uncertainty:
- ``tables/<model>.verdict.r<ratio>.csv`` (every paired comparison, per task too), ``tables/<model>.main.*``
  (Table 1 form: accuracy with 95 % CIs and n, average, perplexity, fidelity, size), ``<model>.ablation.*``
  (Table 6 form, with CIs and which cells differ from the baseline), ``<model>.fidelity.*`` (Table 7),
  ``<model>.efficiency.*`` (Table 4, medians with the per-repeat ratio range), ``scoring_cost.*`` (Table 5);
  each as CSV (numbers), markdown and LaTeX (formatted);
- ``plots/<model>.{forest,rank_stability,avg_vs_ratio,ppl_vs_ratio,neurons_kept}.png``.

Where a model's config entry has a ``paper_name`` that the paper reports (hfprune/reference/*.csv), the
paper's published rows sit beside ours, marked "(paper)". Only the cells the config asks for are reported
(metrics left over from an earlier, larger config are ignored); cells not yet evaluated are listed.

The package, one module per concern (each imports only those before it): `loading` (runs, records, plans, the
paper's reference figures), `verdicts` (paired comparisons, intervals, power: numbers only), `paper_tables` (the
paper's table forms), `rendering` (formatting; markdown, CSV, LaTeX), `plots` (the report's own plots) and
`assembly` (report.md).
"""

from hfprune.report.assembly import write_report
from hfprune.report.loading import aggregate, experiment_dir, load_records, load_runs
from hfprune.report.paper_tables import criterion_label
from hfprune.report.verdicts import verdict_tables

__all__ = ["aggregate", "criterion_label", "experiment_dir", "load_records", "load_runs", "verdict_tables",
           "write_report"]
