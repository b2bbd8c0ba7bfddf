"""Out-of-distribution sets (Yelp, IMDB, MNLI, MNLI-hard, ANLI): reading them, and one as an eval split.

Below both the loop (`trainer.eval_split`: early stopping on an OOD dev set) and the OOD evaluator
(robustft/robustness/ood.py), which import it. The sets are declared in conf/robustness/ood.yaml.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig, OmegaConf

from robustft.config import CONF_DIR
from robustft.errors import UserError, excerpt
from robustft.robustness.common import label_names, require_classification, resolve_resource

csv.field_size_limit(1 << 24)


@dataclass
class OODSet:
    name: str
    texts: list[tuple[str, ...]]
    labels: list[str]  # label names of the set


def clean_textfooler(text: str) -> str:
    """Undo the CSV escaping of TextFooler's Yelp/IMDB samples.

    810 Yelp texts are wrapped in quotes with inner quotes doubled and newlines written as a literal
    backslash-n (MANIFEST); strip the wrapping quotes, turn the escapes (also \\uXXXX) back, and
    collapse spaces.
    """
    if text.startswith('"'):
        text = text[1:-1] if len(text) > 1 and text.endswith('"') else text[1:]
    for escaped, plain in (("\\n", " "), ('\\""', '"'), ('\\ ""', '"'), ('""', '"'), ('\\"', '"')):
        text = text.replace(escaped, plain)
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)  # \u00e9 -> é
    return re.sub(r"\s+", " ", text).strip()


def _label(raw: str, mapping: Mapping[str, str], where: str) -> str:
    key = str(raw).strip()
    if key not in mapping:
        raise UserError(f"{where}: label '{excerpt(key)}' is not in the set's label map {excerpt(sorted(mapping))}; fix the file "
                        "or the catalog entry in conf/robustness/ood.yaml")
    return mapping[key]


def read_set(name: str, spec: Mapping[str, Any], data_dir: Path | None, limit: int | None) -> OODSet:
    """Read one catalog set (local file, or the hub when no data_dir is set and the entry has `hub`)."""
    labels_map = {str(k): str(v) for k, v in spec["labels"].items()}
    texts: list[tuple[str, ...]] = []
    labels: list[str] = []
    if data_dir is None:
        return _read_hub(name, spec, limit)
    path = resolve_resource(str(spec["file"]), data_dir, f"OOD set '{name}'")
    reader = spec["reader"]
    if reader == "textfooler":
        n_fields = None
        for lineno, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.split(" ", 1)
            n_fields = n_fields or len(parts)
            if len(parts) != n_fields or len(parts) < 2:
                raise UserError(f"{path}:{lineno}: malformed line ({len(parts)} fields, expected {n_fields}); fix it")
            fields = tuple(clean_textfooler(p) if spec.get("clean") else p for p in parts[1:])
            texts.append(fields)
            labels.append(_label(parts[0], labels_map, f"{path}:{lineno}"))
    elif reader == "tsv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows)
            try:
                cols = [header.index(c) for c in spec["columns"]]
                lab = header.index(spec["label_column"])
            except ValueError as e:
                raise UserError(f"{path}: header lacks a column ({e}); fix the catalog entry '{name}'") from None
            for lineno, row in enumerate(rows, start=2):
                if len(row) != len(header):
                    raise UserError(f"{path}:{lineno}: malformed row ({len(row)} fields, expected {len(header)})")
                texts.append(tuple(row[c] for c in cols))
                labels.append(_label(row[lab], labels_map, f"{path}:{lineno}"))
    elif reader == "lines":
        columns = [(path / c).read_text("utf-8").splitlines() for c in [*spec["columns"], spec["label_column"]]]
        if len({len(c) for c in columns}) != 1:
            raise UserError(f"{path}: files {[*spec['columns'], spec['label_column']]} differ in line count")
        *fields, raw = columns
        texts = list(zip(*fields))
        labels = [_label(x, labels_map, f"{path / spec['label_column']}:{i + 1}") for i, x in enumerate(raw)]
    elif reader == "jsonl":
        for lineno, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                texts.append(tuple(str(row[c]) for c in spec["columns"]))
                labels.append(_label(row[spec["label_column"]], labels_map, f"{path}:{lineno}"))
    else:
        raise UserError(f"OOD set '{name}' has unknown reader '{reader}'; use textfooler, tsv, lines or jsonl")
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    return OODSet(name, texts, labels)


def _read_hub(name: str, spec: Mapping[str, Any], limit: int | None) -> OODSet:
    hub = spec.get("hub")
    if not hub:
        raise UserError(f"OOD set '{name}' exists only as a local file; set data_dir=/path/to/data (shared/data layout)")
    from datasets import load_dataset

    from robustft.hub import cache_only_if_unreachable

    try:
        with cache_only_if_unreachable():
            ds = load_dataset(hub["path"], hub.get("name"), split=hub["split"])
    except Exception as e:  # noqa: BLE001 - any hub failure has the same fix
        raise UserError(f"could not load {hub['path']} ({type(e).__name__}); offline, set data_dir") from None
    mapping = {str(k): str(v) for k, v in hub["labels"].items()}
    rows = [r for r in ds if str(r["label"]) in mapping]  # hub NLI sets mark unlabelled rows with -1
    if limit is not None:
        rows = rows[:limit]
    return OODSet(name, [tuple(str(r[c]) for c in hub["columns"]) for r in rows],
                  [mapping[str(r["label"])] for r in rows])


def text_fields(spec: Mapping[str, Any]) -> int:
    """How many texts a row of the set has (sentiment sets without `columns`: 1; NLI: 2)."""
    return len(spec.get("columns") or []) or (1 if spec.get("family") == "sentiment" else 2)


def set_label_names(spec: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in spec["labels"].values()))


def reconcile(model_labels: Sequence[str], set_labels: Sequence[str], collapse: Mapping[str, str] | None) -> bool | None:
    """True = compare after collapsing, False = compare directly, None = the label spaces do not fit."""
    if set(set_labels) <= set(model_labels) and len(set_labels) == len(model_labels):
        return False
    if collapse:
        c = dict(collapse)
        if {c.get(x, x) for x in model_labels} == {c.get(x, x) for x in set_labels}:
            return True
    return None


def to_py(x: Any) -> Any:
    """Plain Python containers from OmegaConf ones (instantiate hands over DictConfigs)."""
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def catalog(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The OOD catalog: robustness.ood's when it is composed, else the packaged conf/robustness/ood.yaml."""
    composed = OmegaConf.select(cfg, "robustness.ood.catalog")
    if composed is None:
        composed = OmegaConf.load(CONF_DIR / "robustness" / "ood.yaml").catalog
    return {k: dict(to_py(v)) for k, v in to_py(composed).items()}


def dev_split(name: str, cfg: DictConfig, limit: int | None) -> Dataset:
    """An OOD catalog set as an evaluation split of the task (trainer.eval_split: early stopping on OOD data).

    Only sets whose label names are the task's own qualify: a collapsed set (3-way gold, 2-way model)
    scores argmax-then-map, which the loop's task metrics cannot express.
    """
    task, sets = cfg.task, catalog(cfg)
    if name not in sets:
        raise UserError(f"trainer.eval_split={name} is neither 'validation' nor an OOD set; choose from "
                        f"validation, {', '.join(sets)} (conf/robustness/ood.yaml)")
    require_classification(task, f"trainer.eval_split={name}")
    spec, names = sets[name], label_names(task)
    n_fields = text_fields(spec)
    if n_fields != len(task.text_fields) or reconcile(names, set_label_names(spec), None) is not False:
        raise UserError(f"trainer.eval_split={name}: its labels {set_label_names(spec)} / {n_fields} text field(s) "
                        f"do not match task {task.name} ({names}); pick a set of the same task family")
    data_dir = None if cfg.data_dir is None else Path(str(cfg.data_dir)).expanduser()
    data = read_set(name, spec, data_dir, limit)
    columns: dict[str, list[Any]] = {"idx": list(range(len(data.texts)))}
    for i, field in enumerate(task.text_fields):
        columns[str(field)] = [t[i] for t in data.texts]
    columns["label"] = [names.index(g) for g in data.labels]
    return Dataset.from_dict(columns)
