"""What prepare reads: the image files of a folder or zip, in sorted order, with labels.

A source is a local folder (searched recursively) or a zip, including the official
StyleGAN dataset zips (images plus a `dataset.json` holding `labels`). Names are
POSIX paths relative to the source root, sorted, so the same input always gives
the same order. Hidden files and folders (".git", ".DS_Store") are ignored; every
other file that is not used becomes a `skipped` entry with its reason.

Labels (`--labels`):
  auto      the source's dataset.json labels if it has them, else none (default)
  none      unconditional
  folders   the first folder below the root is the class ("cats/x.png")
  FILE.csv  rows of `filename,label` (a header row `filename,label` is allowed)
Integer labels are used as class indices; text labels are numbered in sorted order.
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from dataclasses import dataclass, field

from sg2dist.data.imageops import IMAGE_EXTENSIONS
from sg2dist.errors import UserError

STYLEGAN_LABELS_FILE = "dataset.json"


class Source:
    """Read access to the files of a folder or a zip."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if os.path.isdir(path):
            self.kind = "folder"
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            self.kind = "zip"
            self._zip = zipfile.ZipFile(path)
        elif os.path.exists(path):
            raise UserError(
                f"{path} is neither a folder nor a zip file; pass a folder of images or a zip"
            )
        else:
            raise UserError(f"source {path} does not exist; pass a folder of images or a zip")

    def names(self) -> list[str]:
        if self._zip is not None:
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        else:
            names = []
            for root, dirs, files in os.walk(self.path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel_root = os.path.relpath(root, self.path)
                for file in files:
                    rel = file if rel_root == "." else os.path.join(rel_root, file)
                    names.append(rel.replace(os.sep, "/"))
        return sorted(n for n in names if not _is_hidden(n))

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


@dataclass
class InputList:
    images: list[tuple[str, int | None]]  # (name, class index or None), sorted by name
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"}
    label_names: list[str] = field(default_factory=list)  # [] = unconditional
    labels_from: str = "none"


def _number_labels(raw: dict[str, str], where: str) -> tuple[dict[str, int], list[str]]:
    """Raw label text per file -> (class index per file, class names)."""
    values = set(raw.values())
    if all(v.lstrip("-").isdigit() for v in values):
        as_int = {name: int(v) for name, v in raw.items()}
        if min(as_int.values(), default=0) < 0:
            raise UserError(f"{where} has a negative class label; use labels 0..N-1")
        return as_int, [str(i) for i in range(max(as_int.values(), default=-1) + 1)]
    names = sorted(values)
    index = {v: i for i, v in enumerate(names)}
    return {name: index[v] for name, v in raw.items()}, names


def _labels_from_csv(csv_path: str) -> dict[str, str]:
    if not os.path.isfile(csv_path):
        raise UserError(f"labels file {csv_path} does not exist; pass a CSV of filename,label rows")
    labels: dict[str, str] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or (
                line_no == 1 and [c.strip().lower() for c in row] == ["filename", "label"]
            ):
                continue
            if len(row) != 2:
                raise UserError(
                    f"{csv_path} line {line_no} has {len(row)} fields; write filename,label"
                )
            labels[row[0].strip().removeprefix("./")] = row[1].strip()
    return labels


def _labels_from_stylegan_json(source: Source) -> dict[str, str] | None:
    """The `labels` of an official StyleGAN dataset.json, or None when it has none."""
    where = f"{source.path}:{STYLEGAN_LABELS_FILE}"
    try:
        document = json.loads(source.read(STYLEGAN_LABELS_FILE))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{where} is not valid JSON ({exc}); fix or remove it") from None
    pairs = document.get("labels") if isinstance(document, dict) else None
    if pairs is None:
        return None
    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], int) for p in pairs):
        raise UserError(f"{where}: only integer class labels [[file, class], ...] are supported")
    return {str(name): str(label) for name, label in pairs}


def _raw_labels(source: Source, names: list[str], labels: str) -> tuple[dict[str, str] | None, str]:
    """(label text per file, or None for unconditional; a description of where from)."""
    if labels == "none":
        return None, "none"
    if labels == "auto":
        if STYLEGAN_LABELS_FILE in names:
            raw = _labels_from_stylegan_json(source)
            return (raw, STYLEGAN_LABELS_FILE) if raw is not None else (None, "none")
        return None, "none"
    if labels == "folders":
        return {n: n.split("/")[0] for n in names if "/" in n}, "folders"
    if labels.lower().endswith(".csv"):
        return _labels_from_csv(labels), f"csv:{os.path.basename(labels)}"
    raise UserError(f"--labels {labels!r} is not auto, none, folders or a .csv file")


def list_inputs(source: Source, labels: str = "auto") -> InputList:
    """The images to prepare, with labels, plus the files that will not be used and why."""
    names = source.names()
    raw_labels, labels_from = _raw_labels(source, names, labels)
    metadata = {STYLEGAN_LABELS_FILE} if labels_from == STYLEGAN_LABELS_FILE else set()
    candidates: list[str] = []
    skipped: list[dict[str, str]] = []
    for name in names:
        extension = os.path.splitext(name)[1].lower()
        if name in metadata:
            continue
        if extension not in IMAGE_EXTENSIONS:
            skipped.append(
                {"file": name, "reason": f"not an image file ({extension or 'no extension'})"}
            )
        elif raw_labels is not None and name not in raw_labels:
            reason = (
                "not inside a class folder"
                if labels_from == "folders"
                else f"no label in {labels_from}"
            )
            skipped.append({"file": name, "reason": reason})
        else:
            candidates.append(name)
    if raw_labels is None:
        return InputList([(n, None) for n in candidates], skipped)
    index, label_names = _number_labels({n: raw_labels[n] for n in candidates}, labels_from)
    return InputList([(n, index[n]) for n in candidates], skipped, label_names, labels_from)
