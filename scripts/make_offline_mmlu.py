"""Write hfprune/tasks/offline_mmlu/ from lm-eval's stock `mmlu` group (lm_eval/tasks/mmlu/default): the same
group tree (mmlu -> stem / other / social_sciences / humanities -> 57 subjects), prompts, targets, metrics and
aggregation, every name prefixed `offline_`, the data read by `hfprune.tasks.offline.mmlu` (the subject passed in
dataset_kwargs, which lm-eval hands to a custom_dataset) and only the evaluated test split kept (as for the other
offline tasks: no few-shot split).

    python scripts/make_offline_mmlu.py        # rewrites hfprune/tasks/offline_mmlu (committed)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hfprune.tasks import TASK_DIR

OUT = TASK_DIR / "offline_mmlu"
TEMPLATE = "_default_template_yaml"  # not *.yaml: lm-eval indexes it only through the subjects' `include`
_DROP = ("dataset_path", "fewshot_split", "fewshot_config")  # the hub dataset, and splits we do not build


def stock_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"


def _offline(name: str) -> str:
    return f"offline_{name}"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings in double quotes with \\n escapes, as the stock files write them."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if "\n" in value else None))


def _dump(path: Path, header: str, cfg: dict, extra: str = "") -> None:
    text = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, width=1000, default_flow_style=None)
    path.write_text(f"# {header}\n" + extra + text)


def main() -> None:
    src = stock_dir()
    OUT.mkdir(exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    stock = "Stock lm-eval 0.4.13 {} (lm_eval/tasks/mmlu/default/{}), data rebuilt offline (hfprune.tasks.offline)."
    template = {k: v for k, v in yaml.safe_load((src / TEMPLATE).read_text()).items() if k not in _DROP}
    _dump(OUT / TEMPLATE, stock.format("MMLU template", TEMPLATE), template,
          "custom_dataset: !function hfprune.tasks.offline.mmlu\n")
    for path in sorted(src.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if "group" in cfg:  # the group tree: rename the group and what it holds
            out = {**cfg, "group": _offline(cfg["group"]), "task": [_offline(t) for t in cfg["task"]]}
        else:
            out = {"include": TEMPLATE, "task": _offline(cfg["task"]), "task_alias": cfg["task_alias"],
                   "tag": _offline(cfg["tag"]), "description": cfg["description"],
                   "dataset_kwargs": {"subject": cfg["dataset_name"]}}
        _dump(OUT / path.name, stock.format(cfg.get("group") or cfg["task"], path.name), out)
    print(f"{OUT}: {len(list(OUT.iterdir()))} files")


if __name__ == "__main__":
    main()
