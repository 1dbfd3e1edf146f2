"""A DART split that measures the method: evaluated inputs disjoint from training by entity and table,
every annotation source in proportion on both sides.

Only DART's dev file is published beside the data here (2,768 triple sets). The earlier study trained on
its first rows (all WebNLG) and evaluated on its last (mostly WikiSQL / WikiTableQuestions), which measured
domain transfer, and 40 evaluated inputs shared triples with training. This split:

- groups triple sets into *components*: two sets are in one component when they share a subject entity,
  an entity one of them has as subject and the other as object, or a source table (the object of a
  ``[TABLECONTEXT] [TITLE]`` triple); names compared lower-cased. A component goes wholly to one side, so
  no evaluated input shares a triple, a subject or a table with a training row;
- draws the evaluated inputs source by source in proportion to the dev file's inputs (e2e, webnlg,
  WikiSQL, WikiTableQuestions), from components in a seeded random order; sets of a chosen component beyond
  its source's quota are withheld (neither trained on nor evaluated);
- draws the training rows (one per annotation) from the other components, source by source in proportion
  to the dev file's rows.

``write_split`` writes the two slices in the published layout (``dart-v1.1.1-full-train.json`` and
``dart-v1.1.1-full-dev.json``, for ``--data_dir``) and a description without any dataset text
(``split.json``: counts per source, the evaluated inputs' original indices and sources, the checks).
The copy-the-triples template (each triple as "subject predicate object.") is scored on the evaluated
inputs there too, cased and lower-cased (the official DART script lower-cases): the floor a trained model
must beat.

    python repro/dart_split.py --output_dir study_runs/data/dart_entity
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter, defaultdict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from ds_loradrop.eval.metrics import corpus_bleu, rouge_l

DEV_FILE = "dart-v1.1.1-full-dev.json"
TRAIN_FILE = "dart-v1.1.1-full-train.json"
TABLE_SUBJECT = "[TABLECONTEXT]"
TITLE_PREDICATE = "[TITLE]"
SPLIT_SEED = 0  # the split is fixed: every run's seed sees the same slices


def annotated(item: dict) -> list[dict]:
    return [a for a in item["annotations"] if (a.get("text") or "").strip()]


def source_of(item: dict) -> str:
    """An input's annotation source (every DART dev input has annotations from one source)."""
    sources = Counter(a.get("source", "") for a in annotated(item))
    return sources.most_common(1)[0][0] if sources else ""


def components(items: list[dict]) -> list[list[int]]:
    """Indices of ``items`` grouped into components (module docstring), each ascending, in order of their
    first index."""
    parent: dict[object, object] = {}

    def find(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def union(a, b):
        parent[find(a)] = find(b)

    subjects = {s.lower() for item in items for s, _, _ in item["tripleset"] if s != TABLE_SUBJECT}
    for index, item in enumerate(items):
        find(("set", index))
        for subject, predicate, obj in item["tripleset"]:
            if subject == TABLE_SUBJECT:
                if predicate == TITLE_PREDICATE:
                    union(("set", index), ("table", obj.lower()))
                continue
            union(("set", index), ("entity", subject.lower()))
            if obj.lower() in subjects:
                union(("set", index), ("entity", obj.lower()))
    groups: dict[object, list[int]] = defaultdict(list)
    for index in range(len(items)):
        groups[find(("set", index))].append(index)
    return sorted(groups.values(), key=lambda g: g[0])


def proportional_quotas(counts: Counter, total: int) -> dict[str, int]:
    """``total`` shared among the keys of ``counts`` in proportion (largest remainders), each key at most
    its count."""
    whole = sum(counts.values())
    exact = {key: total * n / whole for key, n in counts.items()}
    quotas = {key: min(int(value), counts[key]) for key, value in exact.items()}
    for key in sorted(exact, key=lambda k: (-(exact[k] - int(exact[k])), k)):
        if sum(quotas.values()) >= total:
            break
        if quotas[key] < counts[key]:
            quotas[key] += 1
    return quotas


def choose_eval_components(
    groups: list[list[int]], sources: list[str], quotas: dict[str, int], seed: int
) -> list[list[int]]:
    """Components that together hold at least each source's quota of inputs: in a seeded random order,
    first those that fit in what their sources still need, then (for a quota still open) the smallest
    component that fills it."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    need = dict(quotas)
    chosen: list[int] = []

    def counts(group):
        return Counter(sources[i] for i in group)

    for g in order:
        c = counts(groups[g])
        if all(n <= need.get(s, 0) for s, n in c.items()):
            chosen.append(g)
            for s, n in c.items():
                need[s] -= n
    for source in sorted(need):
        while need[source] > 0:
            candidates = [g for g in order if g not in chosen and counts(groups[g])[source] > 0]
            if not candidates:
                raise ValueError(f"not enough {source!r} inputs for its evaluation quota")
            g = min(candidates, key=lambda k: (len(groups[k]), order.index(k)))
            chosen.append(g)
            for s, n in counts(groups[g]).items():
                need[s] = need.get(s, 0) - n
    return [groups[g] for g in sorted(chosen)]


def split_dart(items: list[dict], num_eval: int, num_train_rows: int, seed: int = SPLIT_SEED) -> dict:
    """The split (pure): ``{"eval": [index], "withheld": [index], "train_rows": [(index, annotation)]}``
    plus per-source counts; indices into ``items``."""
    usable = [i for i, item in enumerate(items) if annotated(item)]
    sources = [source_of(item) for item in items]
    groups = components(items)
    input_quotas = proportional_quotas(Counter(sources[i] for i in usable), num_eval)
    eval_groups = choose_eval_components(groups, sources, input_quotas, seed)
    pool = sorted(i for group in eval_groups for i in group)
    taken: Counter = Counter()
    evaluated, withheld = [], []
    for index in pool:
        if index in usable and taken[sources[index]] < input_quotas.get(sources[index], 0):
            evaluated.append(index)
            taken[sources[index]] += 1
        else:
            withheld.append(index)
    excluded = set(pool)
    rows_by_source: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for index in usable:
        if index not in excluded:
            for k, annotation in enumerate(items[index]["annotations"]):
                if (annotation.get("text") or "").strip():
                    rows_by_source[annotation.get("source", "")].append((index, k))
    all_rows = Counter(a.get("source", "") for i in usable for a in annotated(items[i]))
    row_quotas = proportional_quotas(all_rows, num_train_rows)
    rng = random.Random(seed + 1)
    train_rows = []
    for source in sorted(row_quotas):
        rows = rows_by_source.get(source, [])
        if len(rows) < row_quotas[source]:
            raise ValueError(f"only {len(rows)} {source!r} training rows for a quota of {row_quotas[source]}")
        train_rows.extend(rng.sample(rows, row_quotas[source]))
    rng.shuffle(train_rows)
    return {
        "eval": evaluated,
        "withheld": withheld,
        "train_rows": train_rows,
        "eval_by_source": dict(Counter(sources[i] for i in evaluated)),
        "train_rows_by_source": dict(Counter(items[i]["annotations"][k]["source"] for i, k in train_rows)),
        "dev_inputs_by_source": dict(Counter(sources[i] for i in usable)),
        "dev_rows_by_source": dict(all_rows),
        "num_components": len(groups),
        "eval_components": len(eval_groups),
    }


def overlap(items: list[dict], split: dict) -> dict[str, int]:
    """Shared triples and subjects between the evaluated inputs and the training rows (lower-cased)."""
    train_sets = {i for i, _ in split["train_rows"]}

    def triples(indices):
        return {tuple(x.lower() for x in t) for i in indices for t in items[i]["tripleset"]}

    def subjects(indices):
        return {t[0].lower() for i in indices for t in items[i]["tripleset"] if t[0] != TABLE_SUBJECT}

    return {
        "shared_triples": len(triples(split["eval"]) & triples(train_sets)),
        "shared_subjects": len(subjects(split["eval"]) & subjects(train_sets)),
        "shared_inputs": len(set(split["eval"]) & train_sets),
    }


def copy_template(triples: list[list[str]]) -> str:
    """The floor: each triple copied as "subject predicate object."."""
    return " ".join(f"{s} {p} {o}." for s, p, o in triples)


def template_scores(items: list[dict], evaluated: list[int]) -> dict[str, float]:
    predictions = [copy_template(items[i]["tripleset"]) for i in evaluated]
    references = [[a["text"].strip() for a in annotated(items[i])] for i in evaluated]
    return {
        "bleu": corpus_bleu(predictions, references),
        "bleu_lowercase": corpus_bleu(predictions, references, lowercase=True),
        "rouge_l": rouge_l(predictions, references),
    }


def write_split(
    dev_path: str, output_dir: str, num_eval: int, num_train_rows: int, description_path: str | None = None
) -> dict:
    """Write the two slices into ``output_dir`` and return the description (also written to
    ``output_dir/split.json`` and, if given, ``description_path``)."""
    with open(dev_path) as handle:
        items = json.load(handle)
    split = split_dart(items, num_eval, num_train_rows)
    os.makedirs(output_dir, exist_ok=True)
    train_items: dict[int, dict] = {}
    for index, k in split["train_rows"]:
        entry = train_items.setdefault(index, {"tripleset": items[index]["tripleset"], "annotations": []})
        entry["annotations"].append(items[index]["annotations"][k])
    # one training record per chosen row, in the shuffled order (a set's rows are not kept together)
    train_records = [
        {"tripleset": items[index]["tripleset"], "annotations": [items[index]["annotations"][k]]}
        for index, k in split["train_rows"]
    ]
    eval_records = [items[i] for i in split["eval"]]
    for name, records in ((TRAIN_FILE, train_records), (DEV_FILE, eval_records)):
        with open(os.path.join(output_dir, name), "w") as handle:
            json.dump(records, handle)
    description = {
        "source_file": os.path.basename(dev_path),
        "seed": SPLIT_SEED,
        "num_eval_inputs": len(split["eval"]),
        "num_train_rows": len(split["train_rows"]),
        "num_train_inputs": len(train_items),
        "num_withheld_inputs": len(split["withheld"]),
        "num_components": split["num_components"],
        "eval_components": split["eval_components"],
        "eval_by_source": split["eval_by_source"],
        "train_rows_by_source": split["train_rows_by_source"],
        "dev_inputs_by_source": split["dev_inputs_by_source"],
        "dev_rows_by_source": split["dev_rows_by_source"],
        "overlap": overlap(items, split),
        "template": template_scores(items, split["eval"]),
        # the evaluated inputs in the order of the written dev file: original index and source
        "eval_inputs": [{"index": i, "source": source_of(items[i])} for i in split["eval"]],
    }
    for path in filter(None, (os.path.join(output_dir, "split.json"), description_path)):
        with open(path, "w") as handle:
            json.dump(description, handle, indent=2)
    return description


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dev_file", default=os.path.join(REPO_ROOT, "..", "shared", "data", "dart", DEV_FILE)
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_eval", type=int, default=500)
    parser.add_argument("--num_train_rows", type=int, default=1200)
    parser.add_argument("--description", default=None, help="Also write the description here.")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.dev_file):
        sys.exit(f"error: DART dev file {args.dev_file!r} does not exist")
    description = write_split(
        args.dev_file, args.output_dir, args.num_eval, args.num_train_rows, args.description
    )
    print(json.dumps({k: v for k, v in description.items() if k != "eval_inputs"}, indent=2))


if __name__ == "__main__":
    main()
