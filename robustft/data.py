"""Task data: GLUE (and SNLI) from the Hugging Face hub, or from local GLUE-format TSV files.

Every split comes out with the same columns whichever the source: `idx` (int, stable example id),
the task's text fields (HF GLUE names, e.g. `sentence1`, `sentence2`), and `label` (class id in
GLUE/HF order, or a float for regression).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from omegaconf import DictConfig, OmegaConf

from robustft.errors import UserError, excerpt
from robustft.splits import SELECTION, DevCarve, arrange_splits, official_source, selection_mode

csv.field_size_limit(1 << 24)


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """Config value, else $ROBUSTFT_DATA_DIR, else None (= use the hub)."""
    value = data_dir or os.environ.get("ROBUSTFT_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"data_dir '{excerpt(value)}' is not a folder; set data_dir=/path/to/data (the layout of shared/data)")
    return path


def label_kwargs(task: DictConfig) -> dict:
    """The label part of a model config for the task (num_labels, problem_type, id2label/label2id)."""
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    names = list(task.label_names)
    return {
        "num_labels": len(names),
        "problem_type": "single_label_classification",
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def label_parser(task: DictConfig):
    """Return raw-string -> label id (or float) for the task; rejects anything outside the label set."""
    name, regression, names = str(task.name), bool(task.is_regression), [str(n) for n in task.label_names]
    ids = {n: i for i, n in enumerate(names)} | {str(i): i for i in range(len(names))}

    def parse(raw: str, where: str) -> int | float:
        raw = raw.strip()
        if regression:
            try:
                return float(raw)
            except ValueError:
                raise UserError(f"{where}: label '{excerpt(raw)}' is not a number; task {name} is regression, fix the row") from None
        if raw in ids:
            return ids[raw]
        raise UserError(
            f"{where}: label '{excerpt(raw)}' is not in task {name}'s label set {names} (or ids 0..{len(names) - 1}); fix or drop the row"
        )

    return parse


def read_glue_tsv(path: Path, spec: Mapping[str, Any], task: DictConfig) -> dict[str, list]:
    """Read one GLUE-format TSV with QUOTE_NONE (text contains bare quotes) into columns.

    `spec.columns` maps our field names to header names (header files) or 0-based indices.
    """
    if not path.is_file():
        raise UserError(f"missing data file {path}; check data_dir (expected the layout of shared/data/MANIFEST.md)")
    try:
        return _read_rows(path, spec, task)
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        raise UserError(f"{path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r}: {e.reason}); "
                        "save it as UTF-8 tab-separated text, or check data_dir points at the GLUE files") from None
    except csv.Error as e:  # e.g. NUL bytes
        raise UserError(f"{path} is not a tab-separated text file ({e}); fix the file or check data_dir") from None


def _read_rows(path: Path, spec: Mapping[str, Any], task: DictConfig) -> dict[str, list]:
    out: dict[str, list] = {"idx": [], **{name: [] for name in spec["columns"]}}
    parse_label, regression = label_parser(task), bool(task.is_regression)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows: Iterator[list[str]] = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.get("header", True):
            header = next(rows, None)
            if header is None:
                raise UserError(f"{path} is empty; expected a header line and rows")
            try:
                cols = {name: header.index(col) for name, col in spec["columns"].items()}
            except ValueError as e:
                raise UserError(f"{path}: header {excerpt(header)} lacks a column ({excerpt(e)}); fix the file or task.local columns") from None
            num_fields = len(header)
        else:
            cols = {name: int(col) for name, col in spec["columns"].items()}
            num_fields = int(spec["num_fields"])
        for lineno, row in enumerate(rows, start=2 if spec.get("header", True) else 1):
            if len(row) == num_fields + 1 and row[-1] == "":
                row = row[:-1]  # tolerate a trailing tab
            if len(row) != num_fields:
                raise UserError(
                    f"{path}:{lineno}: malformed row, expected {num_fields} tab-separated fields, found {len(row)}; fix or remove that line"
                )
            record = {name: row[i] for name, i in cols.items()}
            if not regression and record["label"].strip() == "-":
                continue  # SNLI rows without a gold label are dropped, as the hub version does
            record["label"] = parse_label(record["label"], f"{path}:{lineno}")
            out["idx"].append(len(out["idx"]))
            for name, value in record.items():
                out[name].append(value)
    return out


def shuffled_head(columns: dict[str, list], n: int, seed: int) -> dict[str, list]:
    """The rows `Dataset.from_dict(columns).shuffle(seed=seed).select(range(n))` holds, in its order.

    datasets' shuffle draws `np.random.default_rng(seed).permutation(len)`; drawing it here picks the
    same rows without building an Arrow table (and an indices mapping) of every row first.
    """
    rows = np.random.default_rng(seed).permutation(len(columns["idx"]))[:n]
    return {name: [values[i] for i in rows] for name, values in columns.items()}


def _load_local(task: DictConfig, data_dir: Path, train_cap: int = 0, seed: int = 0) -> DatasetDict:
    """Every local split of the task; `train_cap` > 0 keeps only the seeded sample of train a run uses."""
    splits = {}
    for split, spec in task.local.items():
        spec = OmegaConf.to_container(spec)
        path = data_dir / spec["file"]
        if split == "train" and not path.is_file():
            # Train files that the bundle lacks (MNLI, QNLI, QQP) are only an error when training.
            continue
        columns = read_glue_tsv(path, spec, task)
        if split == "train" and train_cap:
            columns = shuffled_head(columns, train_cap, seed)
        splits[split] = Dataset.from_dict(columns)
    return DatasetDict(splits)


def _load_hub(task: DictConfig) -> DatasetDict:
    """Online path: the hub's GLUE (or SNLI) with its own split names mapped onto ours."""
    from datasets import load_dataset

    from robustft.hub import cache_only_if_unreachable

    offline = False
    try:
        with cache_only_if_unreachable() as offline:  # no retries for half a minute when the hub cannot be reached
            raw = load_dataset(task.hub.path, task.hub.name)
    except Exception as e:  # noqa: BLE001 - any hub failure means the same fix for the user
        why = "offline and not in the local cache" if offline else type(e).__name__
        raise UserError(
            f"could not load {task.hub.path}/{task.hub.name} from the Hugging Face hub ({why}); "
            "set data_dir=/path/to/data or ROBUSTFT_DATA_DIR to a folder of GLUE-format files"
        ) from None
    splits = {}
    for ours in ("train", "validation", "test"):
        theirs = task.hub.get(ours)
        if theirs and theirs in raw:
            ds = raw[theirs]
            if "label" in ds.column_names and not task.is_regression:
                ds = ds.filter(lambda ex: ex["label"] >= 0)  # SNLI: -1 = no gold label
            if "idx" not in ds.column_names:
                ds = ds.add_column("idx", list(range(len(ds))))
            keep = ["idx", *task.text_fields, "label"]
            splits[ours] = ds.select_columns(keep)
    return DatasetDict(splits)


class TaskData(DatasetDict):
    """load_task's splits; `carved` is the selection split carved out of train (None with task.selection=dev)."""

    carved: DevCarve | None = None


def load_task(task: DictConfig, data_dir: str | None, seed: int, need_train: bool = True) -> TaskData:
    """Load a task's splits, carve the selection split (task.selection=carve, task.split_seed), apply the caps.

    The carve comes out of the full train set before `max_train_samples` draws the training subset (with
    the run seed) from the rest, so the selection split is the same for every seed and never overlaps training.
    """
    root = resolve_data_dir(data_dir)
    if selection_mode(task) not in SELECTION:
        raise UserError(f"task.selection={task.get('selection')} is not an option; use dev or carve")
    # With selection=dev, cap train while reading it (the same rows and order as the shuffle-and-select
    # below); with carve, the selection split is carved out of the full train first.
    early_cap = int(task.max_train_samples or 0) if root is not None and selection_mode(task) == "dev" else 0
    ds = TaskData(_load_local(task, root, early_cap, seed) if root is not None else _load_hub(task))
    if need_train and "train" not in ds:
        where = f"{root}/{task.local.train.file}" if root is not None else f"{task.hub.path}"
        raise UserError(
            f"task {task.name} has no training file ({where}); train on the hub (data_dir=null, online) "
            "or evaluate only with train=false"
        )
    ds.carved = arrange_splits(ds, task, local=root is not None)
    # The training subsample uses the run seed (seeds of a sweep see different slices), drawn after the carve.
    if task.max_train_samples and "train" in ds and not early_cap:
        n = min(int(task.max_train_samples), len(ds["train"]))
        ds["train"] = ds["train"].shuffle(seed=seed).select(range(n))
    for split in [s for s in ds if s != "train"]:
        ds[split] = cap_eval(ds[split], task)
    for split, d in ds.items():
        if len(d) == 0:
            raise UserError(f"task {task.name}: split '{split}' is empty; check the data files and max_*_samples")
    return ds


def cap_eval(ds: Dataset, task: DictConfig) -> Dataset:
    """`task.max_eval_samples`: the first N examples of an evaluation split."""
    if not task.max_eval_samples:
        return ds
    return ds.select(range(min(int(task.max_eval_samples), len(ds))))


def load_split(task: DictConfig, data_dir: str | Path | None, seed: int, split: str) -> Dataset:
    """One evaluation split as load_task names it, reading only its own file where the bundle has one.

    Saves reading a large train file (SST-2: 67k rows) just to attack a few held-out examples.
    """
    root = resolve_data_dir(str(data_dir) if data_dir else None)
    source = official_source(task, split, local=root is not None)
    if root is not None and source is not None and source != "train" and source in task.local:
        spec = OmegaConf.to_container(task.local[source])
        ds = cap_eval(Dataset.from_dict(read_glue_tsv(root / spec["file"], spec, task)), task)
        if len(ds) == 0:
            raise UserError(f"task {task.name}: split '{split}' is empty; check the data files and max_*_samples")
        return ds
    data = load_task(task, str(root) if root else None, seed, need_train=False)
    if split not in data:
        raise UserError(f"split '{split}' is not a split of task {task.name} ({', '.join(data)}) with "
                        f"task.selection={selection_mode(task)}; choose one of them")
    return data[split]


def tokenize(ds: Dataset, tokenizer, task: DictConfig, max_length: int) -> Dataset:
    """Tokenize without padding (padding happens per batch); keep idx and label."""
    fields = list(task.text_fields)

    def enc(batch: dict) -> dict:
        texts = [batch[f] for f in fields]
        return tokenizer(*texts, truncation=True, max_length=max_length)

    out = ds.map(enc, batched=True, remove_columns=[c for c in ds.column_names if c not in ("idx", "label")])
    return out.with_format("python")


def length_grouped_order(lengths: list[int], batch_size: int, rng: np.random.Generator, mega: int = 50) -> list[int]:
    """HF-style length grouping: shuffle, sort within mega-batches by length, shuffle the batches.

    Keeps randomness across epochs while cutting padding; the longest batch goes first so an
    out-of-memory error shows up at step 1 rather than hours in.
    """
    perm = rng.permutation(len(lengths))
    chunk = batch_size * mega
    ordered: list[list[int]] = []
    for s in range(0, len(perm), chunk):
        block = sorted(perm[s : s + chunk].tolist(), key=lambda i: -lengths[i])
        ordered.extend(block[b : b + batch_size] for b in range(0, len(block), batch_size))
    if ordered:
        longest = max(range(len(ordered)), key=lambda b: lengths[ordered[b][0]])
        ordered[0], ordered[longest] = ordered[longest], ordered[0]
        rest = ordered[1:]
        order = rng.permutation(len(rest))
        ordered = [ordered[0]] + [rest[i] for i in order]
    return [i for b in ordered for i in b]


def epoch_batches(ds: Dataset, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The epoch's batches of row indices, a pure function of (seed, epoch): resume needs no sampler state."""
    rng = np.random.default_rng([seed, epoch])
    if group_by_length:
        order = length_grouped_order([len(x) for x in ds["input_ids"]], batch_size, rng)
    else:
        order = rng.permutation(len(ds)).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def eval_batches(ds: Dataset, batch_size: int) -> list[list[int]]:
    """Eval batches sorted by length (no randomness, minimal padding)."""
    lengths = [len(x) for x in ds["input_ids"]]
    order = sorted(range(len(ds)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(ds: Dataset, rows: list[int], tokenizer, is_regression: bool) -> dict[str, torch.Tensor]:
    """Pad one batch dynamically to its longest sequence."""
    examples = ds[rows]
    feats = {k: examples[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in examples}
    batch = tokenizer.pad(feats, return_tensors="pt")
    batch["labels"] = torch.tensor(examples["label"], dtype=torch.float32 if is_regression else torch.long)
    batch["idx"] = torch.tensor(examples["idx"], dtype=torch.long)
    return dict(batch)
