"""``ddep experiment NAME``: one of the paper's studies as a grid of pretraining and fine-tuning runs.

A study file (``configs/experiments/<scale>/NAME.yaml``) names a base pretraining config and a
base fine-tuning config, the seeds, an *axis* (the table's rows, the plot's x) and *variants*
(the table's columns, the plot's lines). Every axis value and variant is a set of dotted
overrides of the pretraining (``pretrain.KEY``) or fine-tuning (``finetune.KEY``) config;
``pretrain: false`` means no pretraining (fine-tune from ``model.encoder_weights`` with a random
decoder). Overrides apply in this order, the last winning: the study's ``overrides``, the command
line's ``KEY=VALUE`` (data roots, devices, batch sizes), the axis value, the variant: the command
line cannot silently change what the study compares. A cell is a variant at an axis value; it is fine-tuned once per seed (``seed`` and
``data.labeled_seed``), from one pretraining run shared by its seeds. The table shows each variant
against ``baseline`` and the pairs of ``compare`` (``[[variant, other], ...]``) as per-seed
differences; semi-supervised runs also report their pseudo-labels' end-of-training statistics.

Runs are content-addressed: a run's folder is named by a hash of its resolved config, so a run
that several cells or studies share (the baseline, the default pretraining) is made once, a
finished run is skipped, an interrupted one resumes from its last checkpoint, and a changed
config never reuses an old run.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_text_atomic
from ..config import RESULT_NEUTRAL_KEYS, ConfigError, load_config, parse_key_value
from ..engine.finetune import finetune
from ..engine.pretrain import pretrain
from ..models.saving import CONFIG_FILE
from .demo import machine, run_stage
from .report import csv_text, markdown_table, plot, text_table

log = logging.getLogger(__name__)
STUDY_DIR = Path(__file__).resolve().parents[3] / "configs" / "experiments"  # in a source checkout
SCALES = ("demo", "paper")
STAGES = ("pretrain", "finetune")
#: Fine-tuning keys the study sets for each run, never taken from overrides.
SET_BY_STUDY = {"seed": "one run per seed: use seeds or --seeds", "data.labeled_seed": "the seed: use seeds or --seeds",
                "init": "the cell's pretraining run, or none with pretrain: false"}


@dataclass
class Cell:
    """A variant at an axis value: its pretraining config (None: no pretraining) and one
    fine-tuning config per seed."""

    variant: str
    value: str
    pretrain: dict[str, Any] | None
    finetunes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Study:
    name: str
    title: str
    description: str
    axis: str
    values: list[str]
    variants: list[str]
    seeds: list[int]
    baseline: str | None
    log_x: bool
    cells: list[Cell]
    compare: list[tuple[str, str]] = field(default_factory=list)


#: log.csv values a study reports beside the mIoU, at the run's last logged step, in percent.
LOGGED = {"mask_ratio": "unlabeled pixels whose pseudo-label reaches the threshold",
          "pseudo_accuracy": "pseudo-labels that are right, over all unlabeled pixels",
          "pseudo_accuracy_confident": "pseudo-labels that are right, over the pixels above the threshold"}


def study_path(name: str, scale: str = "demo") -> Path:
    """A study file: ``name`` itself when it is a YAML file, else the named study at ``scale``."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"study file not found: {path}")
        return path
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}; got {scale!r}")
    path = STUDY_DIR / scale / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_studies(scale)) or f"none found in {STUDY_DIR / scale}"
        raise ConfigError(f"unknown study {name!r} at {scale} scale (known: {known}); or pass a study file, NAME.yaml")
    return path


def list_studies(scale: str = "demo") -> list[str]:
    return sorted(p.stem for p in (STUDY_DIR / scale).glob("*.yaml"))


def run_hash(config: Mapping[str, Any]) -> str:
    """Ten hex digits of the config's SHA-256, without the keys that do not change the result."""
    kept = {k: v for k, v in config.items() if k not in RESULT_NEUTRAL_KEYS}  # keys that change no result: out
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _split(sources: Sequence[Mapping[str, Any]], where: str) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Dotted ``pretrain.*`` / ``finetune.*`` overrides from several sources, the last winning ->
    (pretraining on?, per-stage nested updates)."""
    pretraining, updates = True, {stage: {} for stage in STAGES}
    for overrides in sources:
        for key, value in overrides.items():
            stage, _, rest = key.partition(".")
            if key == "pretrain":
                if not isinstance(value, bool):
                    raise ConfigError(f"{where}: 'pretrain' takes true or false (false: no pretraining); got {value!r}")
                pretraining = value
            elif stage in STAGES and rest:
                if stage == "finetune" and rest in SET_BY_STUDY:
                    raise ConfigError(f"{where}: {key} is set by the study for each run ({SET_BY_STUDY[rest]})")
                tree: Any = copy.deepcopy(value)
                for part in reversed(rest.split(".")):
                    tree = {part: tree}
                updates[stage] = _merge(updates[stage], tree)
            else:
                raise ConfigError(f"{where}: override keys start with pretrain. or finetune.; got {key!r}")
    return pretraining, updates


def _merge(*trees: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings merged key by key, the last winning."""
    out: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    """A mapping from the study file (None reads as empty), or an error naming ``what``."""
    value = value or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: {what} must be a mapping; got {value!r}")
    return dict(value)


def _axis(spec: Mapping[str, Any], path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """``axis: {name, key, values: [..]}`` or ``axis: {name, values: {label: {overrides}}}``."""
    axis = spec.get("axis")
    if not isinstance(axis, Mapping) or "name" not in axis or "values" not in axis:
        raise ConfigError(f"{path}: axis must be a mapping with name and values")
    values = axis["values"]
    if "key" in axis:
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axis.values must be a non-empty list when axis.key is given")
        return str(axis["name"]), {str(v): {axis["key"]: v} for v in values}
    if not isinstance(values, Mapping) or not values:
        raise ConfigError(f"{path}: axis.values must map labels to overrides (or give axis.key and a list)")
    return str(axis["name"]), {str(k): _mapping(v, f"axis value {k!r}", path) for k, v in values.items()}


def load_study(
    path: str | Path, out: str | Path, overrides: Sequence[str] = (), seeds: Sequence[int] | None = None
) -> Study:
    """Resolve every run of a study file into checked configs, before any work starts."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{path}: expected a mapping")
    unknown = set(spec) - {"title", "description", "pretrain", "finetune", "seeds", "overrides", "axis", "variants", "baseline", "log_x",
                           "compare"}
    if unknown:
        raise ConfigError(f"{path}: unknown study keys {sorted(unknown)}")
    bases = {}
    for stage in STAGES:
        if not isinstance(spec.get(stage), str):
            raise ConfigError(f"{path}: {stage} must name the base {stage} config file (relative to the study file)")
        bases[stage] = path.parent / spec[stage]
    seeds = seeds if seeds is not None else spec.get("seeds", [0])
    if not isinstance(seeds, list | tuple) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers; got {seeds!r}")
    seeds = list(seeds)
    axis_name, axis_values = _axis(spec, path)
    variants = {str(k): _mapping(v, f"variant {k!r}", path) for k, v in _mapping(spec.get("variants"), "variants", path).items()}
    variants = variants or {"DDeP": {}}
    baseline = spec.get("baseline")
    if baseline is not None and baseline not in variants:
        raise ConfigError(f"{path}: baseline {baseline!r} is not one of the variants {list(variants)}")
    compare = spec.get("compare") or []
    if not isinstance(compare, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, str) for v in p)
                                                and p[0] != p[1] and set(p) <= set(variants) for p in compare):
        raise ConfigError(f"{path}: compare must be a list of [variant, other variant] pairs of {list(variants)}; got {compare!r}")
    study_overrides = _mapping(spec.get("overrides"), "overrides", path)
    command_line = dict(parse_key_value(text) for text in overrides)
    out = Path(out)
    cells, shadowed = [], set()
    for value, value_overrides in axis_values.items():
        for variant, variant_overrides in variants.items():
            where = f"{path} ({variant} at {axis_name}={value})"
            shadowed.update(c for c in command_line for k in (*value_overrides, *variant_overrides)
                            if k != "pretrain" and (c == k or k.startswith(c + ".") or c.startswith(k + ".")))
            pretraining, updates = _split([study_overrides, command_line, value_overrides, variant_overrides], where)
            cell = Cell(variant, value, None)
            if pretraining:
                cell.pretrain = _resolve("pretrain", bases["pretrain"], updates["pretrain"], out, where)
            for seed in seeds:
                extra = {"seed": seed, "data": {"labeled_seed": seed},
                         "init": str(out / cell.pretrain["name"] / "model") if cell.pretrain else None}
                cell.finetunes.append(_resolve("finetune", bases["finetune"], _merge(updates["finetune"], extra), out, where))
            cells.append(cell)
    for key in sorted(shadowed):
        log.warning("%s: the study sets %s in some cells, replacing the command line's %s=%r there", path, key, key, command_line[key])
    return Study(path.stem, spec.get("title", path.stem), spec.get("description", ""), axis_name, list(axis_values),
                 list(variants), seeds, baseline, bool(spec.get("log_x", False)), cells, [tuple(p) for p in compare])


def _resolve(command: str, base: Path, updates: dict[str, Any], out: Path, where: str) -> dict[str, Any]:
    try:
        config = load_config(command, base, updates=updates)
    except ConfigError as e:
        raise ConfigError(f"{where}, {command} config: {e}") from None
    data = config["data"]
    if data["dataset"] != "demo" and data["root"] is None:
        raise ConfigError(f"{where}: {command}.data.root is not set for dataset {data['dataset']!r}; pass {command}.data.root=DIR")
    config["out_dir"] = str(out)
    config["name"] = f"runs/{command}-{run_hash(config)}"
    return config


def run_study(study: Study, out: str | Path) -> dict[str, Any]:
    """Make every run that is missing, then write results.json, results.csv, table.md and plot.png
    to ``out/<study name>/``."""
    out = Path(out)
    start = time.perf_counter()
    pretrains = {c.pretrain["name"]: c.pretrain for c in study.cells if c.pretrain}
    finetunes = {f["name"]: f for c in study.cells for f in c.finetunes}
    print(f"{study.title}: {len(study.cells)} cells ({len(study.values)} {study.axis} x {len(study.variants)} variants) "
          f"x {len(study.seeds)} seeds; {len(pretrains)} pretraining and {len(finetunes)} fine-tuning runs in {out / 'runs'}")
    for i, (name, config) in enumerate(pretrains.items(), 1):
        done = not run_stage(pretrain, config, out / name / "model" / CONFIG_FILE)
        print(f"  pretraining {i}/{len(pretrains)}  {name}" + ("  (reused)" if done else ""))
    results: dict[str, dict[str, list[float]]] = {v: {value: [] for value in study.values} for v in study.variants}
    runs: dict[str, dict[str, list[str]]] = {v: {value: [] for value in study.values} for v in study.variants}
    logged: dict[str, dict[str, list[dict[str, float]]]] = {v: {value: [] for value in study.values} for v in study.variants}
    count = 0
    for cell in study.cells:
        for config in cell.finetunes:
            count += 1
            metrics = out / config["name"] / "metrics.json"
            reused = not run_stage(finetune, config, metrics)
            miou = json.loads(metrics.read_text())["mIoU"]
            results[cell.variant][cell.value].append(miou)
            runs[cell.variant][cell.value].append(config["name"])
            logged[cell.variant][cell.value].append(logged_values(out / config["name"] / "log.csv"))
            print(f"  fine-tuning {count}/{len(study.cells) * len(study.seeds)}  {cell.variant} at {study.axis}={cell.value}, "
                  f"seed {config['seed']}: mIoU {miou:.1f}" + ("  (reused)" if reused else ""))
    record = {"study": study.name, "title": study.title, "axis": study.axis, "values": study.values,
              "variants": study.variants, "seeds": study.seeds, "results": results, "runs": runs, "logged": logged,
              "machine": machine(), "seconds": round(time.perf_counter() - start, 1)}
    write_study_report(study, out / study.name, record)
    print()
    print(text_table(results, study.values, study.axis, study.baseline, study.compare))
    print(f"mIoU (%), mean ± std over {len(study.seeds)} seed(s). Written to {out / study.name}/: "
          "results.json, results.csv, table.md, plot.png")
    return record


def logged_values(path: Path) -> dict[str, float]:
    """A run's :data:`LOGGED` values at its last logged step (in percent), and the median of its
    ``images_per_s`` (labeled images per second: the cost of a step)."""
    if not path.is_file():  # log_every=0 (which does not change a run's hash) writes none
        return {}
    last: dict[str, float] = {}
    rates: list[float] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["key"] in LOGGED:
                last[row["key"]] = 100 * float(row["value"])
            elif row["key"] == "images_per_s":
                rates.append(float(row["value"]))
    return {**last, **({"images_per_s": statistics.median(rates)} if rates else {})}


def logged_tables(study: Study, logged: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]]) -> list[str]:
    """A markdown table per :data:`LOGGED` value that some variant's runs have, and their speed."""
    lines = []
    for key, meaning in [*((k, f"{m} (%), at the end of training") for k, m in LOGGED.items()),
                         ("images_per_s", "labeled images per second, the median of each run's log")]:
        values = {v: {value: [run[key] for run in runs if key in run] for value, runs in by_value.items()}
                  for v, by_value in logged.items()}
        values = {v: by_value for v, by_value in values.items() if any(by_value.values())}
        if values:
            lines += [f"{key}: {meaning}; mean ± std over seeds.", "", markdown_table(values, study.values, study.axis)]
    return lines


def write_study_report(study: Study, folder: Path, record: dict[str, Any]) -> None:
    results = record["results"]
    folder.mkdir(parents=True, exist_ok=True)
    plot(results, study.values, folder / "plot.png", study.axis, study.title, log_x=study.log_x)
    write_text_atomic(folder / "results.csv", csv_text(results, study.values, study.axis))
    lines = [f"# {study.title}", "", study.description.strip(), "",
             markdown_table(results, study.values, study.axis, study.baseline, study.compare),
             f"mIoU (%), mean ± std over seeds {', '.join(map(str, study.seeds))}; a difference is the mean ± std of the "
             f"per-seed differences (each seed: the same labeled images for every variant). Machine: {record['machine']}.", "",
             "![plot](plot.png)", "", *logged_tables(study, record.get("logged", {}))]
    write_text_atomic(folder / "table.md", "\n".join(lines))
    write_text_atomic(folder / "results.json", json.dumps(record, indent=2))


def describe(study: Study) -> str:
    """The plan: every cell and the runs it needs, for ``--dry-run``."""
    lines = [f"{study.title} ({study.name}): {study.axis} x variant, seeds {study.seeds}"]
    width_variant, width_value = max(map(len, study.variants)), max(map(len, study.values))
    for cell in study.cells:
        source = cell.pretrain["name"] if cell.pretrain else "no pretraining"
        lines.append(f"  {cell.variant:<{width_variant}s}  {study.axis}={cell.value:<{width_value}s}  {source:<24s} ->  "
                     + ", ".join(f["name"] for f in cell.finetunes))
    return "\n".join(lines)
