"""Readers for the published file formats: CSV, JSON Lines, a JSON array, WebNLG-style XML.

Each raises UsageError naming the file (and line, where the format has lines) of a malformed row.
"""

from __future__ import annotations

import csv
import json
from xml.etree import ElementTree

from ds_loradrop.errors import UsageError


def read_csv(path: str, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a CSV file with a header, every field as text."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        found = reader.fieldnames or []
        missing = [column for column in columns if column not in found]
        if missing:
            raise UsageError(f"{path}: missing column(s) {missing}; found {found}")
        rows = []
        for row in reader:
            if None in row or any(row[column] is None for column in columns):
                raise UsageError(f"{path}:{reader.line_num}: malformed row (expected {len(found)} fields)")
            rows.append({column: row[column] for column in found})
        return rows


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}:{line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise UsageError(f"{path}:{line_number}: expected a JSON object")
            records.append((line_number, record))
    return records


def read_json_array(path: str) -> list:
    with open(path, encoding="utf-8") as handle:
        try:
            value = json.load(handle)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
    if not isinstance(value, list):
        raise UsageError(f"{path}: expected a JSON list of items")
    return value


def read_xml_root(path: str) -> ElementTree.Element:
    try:
        return ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise UsageError(f"{path}:{error.position[0]}: invalid XML ({error})") from error
