"""The generated part of the performance page: benchmark reports as Markdown for reading.

Each ``benchmarks/*.py`` script prints one JSON report. ``make benchmark`` writes them to
``benchmarks/results/`` (the machine building the book; ignored by git) and ``make
benchmark-reference`` copies them to ``benchmarks/reference/`` (committed).
:func:`benchmarks_markdown` renders both into ``book/_generated/benchmarks.md``, which
``book/performance.md`` includes. For every report:

- a heading and one line naming the machine, commit and date that measured it;
- a summary whose every number is computed from the report (:data:`SUMMARIES`): speed-up
  ranges, the largest difference from the baseline against the tolerance of :data:`TARGETS`,
  peak memory against the report's budget;
- the report's values in tables: names and units from :data:`LABELS` (a key not listed there
  is shown with its underscores as spaces), three significant digits (:func:`number`), padded
  columns, at most :data:`MAX_COLUMNS` columns per table (wider ones are split, row names
  repeated in each part).

Everything here is pure except :func:`read_benchmarks`, which reads a folder of reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path

#: Widest table (columns, row names included); wider record tables are split.
MAX_COLUMNS = 6

#: Report key -> (name, unit) for headers and labels; unit ``None`` for counts and text.
#: Keys not listed are shown as the key with underscores as spaces (``_s``/``_gb``: a unit).
LABELS: dict[str, tuple[str, str | None]] = {
    # common
    "model": ("Model", None), "models": ("Models", None), "structures": ("Structures", None),
    "atoms": ("Atoms", None), "layer": ("Layer", None), "device": ("Device", None),
    "dim": ("Features per atom", None), "dims": ("Features per model", None),
    "threads": ("Threads", None), "speedup": ("Speed-up", "×"), "seconds": ("Time", "s"),
    "pairs": ("Model pairs", None), "input": ("Input features", None), "versions": ("Versions", None),
    "baseline": ("Baseline", None), "numpy": ("NumPy", None),
    # extraction
    "results": ("Per model", None), "batch_atoms": ("Atoms per batch", None),
    "batched_s": ("Batched", "s"), "single_s": ("One structure per pass", "s"),
    "ase_loop_s": ("ASE calculator loop", "s"), "speedup_of_batching": ("Gain of batching", "×"),
    "workers": ("Worker processes", None), "workers_s": ("Batched, with workers", "s"),
    "speedup_with_workers": ("Speed-up with workers", "×"),
    "max_energy_diff_eV_per_atom": ("Largest energy difference", "eV/atom"),
    # reconstruction
    "gfre": ("GFRE", None), "lfre": ("LFRE", None), "measure": ("Measure", None),
    "n_local_points": ("Neighbours of a local fit", None), "timing": ("Timing", None),
    "test_atoms": ("Test atoms", None), "ours_s": ("This toolkit", "s"),
    "skmatter_per_pair_s": ("scikit-matter, per pair", "s"),
    "max_abs_diff": ("Largest absolute difference", None),
    "max_rel_diff_where_value_gt_1e-6": ("Largest relative difference (values above 10⁻⁶)", None),
    "value_range": ("Range of values", None),
    # pooling
    "n_structures": ("Structures", None), "atoms_per_structure": ("Atoms per structure", None),
    "orders": ("Per cumulant order", None), "vectorised_s": ("Vectorised", "s"),
    "scipy_loop_s": ("scipy loop", "s"), "max_abs_value": ("Largest absolute value", None),
    # memory
    "inputs_gb": ("Size of the inputs", "GB"), "rss_before_gb": ("Resident memory before", "GB"),
    "peak_rss_gb": ("Peak resident memory", "GB"), "finite": ("All values finite", None),
    "budget_gb": ("Memory budget", "GB"), "within_budget": ("Within the budget", None),
    # scaling
    "us_per_atom": ("Time per atom", "µs"), "store_written_s": ("Writing the synthetic store", "s"),
    "equality": ("Against the in-memory engine", None), "max_rel_diff": ("Largest relative difference", None),
    "memory_seconds": ("In-memory engine", "s"), "memory_peak_rss_gb": ("In-memory engine, peak memory", "GB"),
    "streamed_seconds": ("Streamed", "s"), "memory_over_streamed_rss": ("Peak memory, in-memory over streamed", "×"),
    "test_size": ("Test fraction", None), "metric": ("Measure", None),
    "lfre_results": ("LFRE per size", None), "lfre_equality": ("LFRE against the in-memory engine", None),
    "us_per_train_atom": ("Time per training atom", "µs"),
    # extraction on a cluster
    "one_process_cold_s": ("One process, model loaded in the run", "s"), "one_process_s": ("One process", "s"),
    "one_process_2_forked_s": ("One process, 2 forked workers", "s"), "cluster_start_s": ("Cluster start-up", "s"),
    "dask_local_2_cold_s": ("Dask, 2 workers, models loaded in the run", "s"),
    "dask_local_2_s": ("Dask, 2 workers", "s"), "shards": ("Shards", None), "shard_size": ("Structures per shard", None),
    "forked_speedup": ("Speed-up, forked workers", "×"), "dask_speedup": ("Speed-up, Dask", "×"),
    "dask_speedup_cold": ("Speed-up, Dask with start-up and loading", "×"),
    "identical": ("Entries byte-identical", None), "target_speedup": ("Speed-up aimed at", "×"),
}
#: Heading of a report's records where the generic label does not fit, by (benchmark, key).
RECORD_TITLES = {("scaling", "results"): "GFRE per size", ("scaling", "lfre_results"): "LFRE per size",
                 ("cluster_extraction", "results"): "Per model"}
#: The row-name column of a mapping of records, by the mapping's key.
INDEX_LABELS = {"orders": "Cumulant order"}
_UNIT_SUFFIXES = {"_s": "s", "_gb": "GB", "_mb": "MB"}
#: Column groups kept together when a table is split, in this order.
_GROUPS = ("setting", "time", "ratio", "memory", "difference")
_GROUP_OF = {"max_abs_value": "difference", "value_range": "difference"}

#: What the design asks of each benchmark (a report's own ``tolerance`` entry wins): the largest
#: difference from the baseline, and for extraction the speed-up aimed at. The energy tolerance is
#: the test suite's for calculator energies (``tests/test_calculators.py``).
TARGETS: dict[str, dict[str, float]] = {
    "extraction": {"tolerance": 1e-5, "speedup": 10.0},
    "reconstruction": {"tolerance": 1e-6},
    "pooling": {"tolerance": 1e-6},
    "scaling": {"tolerance": 1e-8},
    "small_panel": {"tolerance": 1e-6},
}

#: Benchmark names (report file stems) and their page titles.
TITLES = {"extraction": "Feature extraction", "reconstruction": "Reconstruction matrices",
          "pooling": "Cumulant pooling", "memory": "Memory at the scale of the study",
          "scaling": "Out-of-core matrices against the number of atoms",
          "cluster_extraction": "Extraction on a Dask cluster",
          "small_panel": "Reconstruction matrix of a small panel"}

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


# ---------------------------------------------------------------------------------------------
# values and labels
# ---------------------------------------------------------------------------------------------

def number(x, digits: int = 3) -> str:
    """A number for reading: ``digits`` significant digits, thousands separated, powers of ten
    (``1.61 × 10⁻¹³``) below 0.001 and from a million; integers in full, booleans yes/no."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    x = float(x)
    if not math.isfinite(x):
        return "not a number" if math.isnan(x) else ("∞" if x > 0 else "−∞")
    if x == 0:
        return "0"
    r = float(f"{x:.{digits}g}")
    exp = math.floor(math.log10(abs(r)))
    if -3 <= exp < 6:
        text = f"{r:,.{max(digits - 1 - exp, 0)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mantissa = f"{r / 10 ** exp:.{digits - 1}f}".rstrip("0").rstrip(".")
    power = f"10{str(exp).translate(_SUPERSCRIPT)}"
    return power if mantissa == "1" else f"{mantissa} × {power}"


def _num(v) -> float | None:
    """``v`` as a finite float, or None when it is not a number (missing, text, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def text(value) -> str:
    """Plain text safe in Markdown and in a table cell (pipes, dollars, emphasis escaped)."""
    out = " ".join(str(value).split())
    for ch in "\\|$*_`":
        out = out.replace(ch, "\\" + ch)
    return out.replace("<", "&lt;")


def value_text(value, key: str = "") -> str:
    """One report value for reading: numbers by :func:`number`, lists joined, mappings as
    ``name value`` pairs, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, (bool, int, float)):
        return number(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{text(k)} {value_text(v, str(k))}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        nums = [_num(v) for v in value]
        if "range" in key and len(value) == 2:
            return " to ".join(value_text(v) for v in value)
        if len(value) > 4 and all(n is not None for n in nums):
            if len(set(nums)) == 1:
                return f"{len(value)} × {number(value[0])}"
            return f"{number(min(value))}–{number(max(value))} ({len(value)} values)"
        return ", ".join(value_text(v) for v in value)
    return text(value)


def label(key) -> str:
    """The name (unit) a report key is shown under."""
    key = str(key)
    if key in LABELS:
        name, unit = LABELS[key]
    else:
        name, unit = key, None
        for suffix, u in _UNIT_SUFFIXES.items():
            if key.lower().endswith(suffix) and len(key) > len(suffix):
                name, unit = key[: -len(suffix)], u
        name = name.replace("_", " ").strip()
        name = name[:1].upper() + name[1:]
    return text(f"{name} ({unit})" if unit else name)


def _group(key: str) -> str:
    """Which column group (:data:`_GROUPS`) a key belongs to, from its unit or name."""
    if key in _GROUP_OF:
        return _GROUP_OF[key]
    unit = LABELS.get(key, (None, None))[1] or next(
        (u for s, u in _UNIT_SUFFIXES.items() if key.lower().endswith(s)), None)
    if "diff" in key:
        return "difference"
    return {"s": "time", "×": "ratio", "GB": "memory", "MB": "memory"}.get(unit) or (
        "ratio" if "speedup" in key else "setting")


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def _numeric(value) -> bool:
    return _num(value) is not None or value is None


def table(header: list[str], rows: list[list[str]], right: list[bool] | None = None) -> str:
    """A padded pipe table; cells are Markdown already. ``right``: right-aligned columns."""
    if not rows or any(len(r) != len(header) for r in rows):
        raise ValueError("a table needs at least one row and one cell per column in every row")
    right = right or [False] * len(header)
    widths = [max(len(header[i]), 3, *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)]) + "\n"


def _flat(v) -> bool:
    """A value one cell can show: a number, text, bool, None, or a flat list of them."""
    scalar = (str, int, float, bool, type(None))
    return isinstance(v, scalar) or (isinstance(v, (list, tuple)) and all(isinstance(x, scalar) for x in v))


def _records(v) -> bool:
    """A non-empty list of flat mappings, or a mapping of flat mappings (the rows of a table)."""
    rows = v.values() if isinstance(v, Mapping) else v if isinstance(v, list) else None
    return bool(rows) and all(isinstance(r, Mapping) and r and all(_flat(x) for x in r.values()) for r in rows)


def _chunks(columns: list[str], width: int) -> list[list[str]]:
    """Columns in tables of at most ``width``, grouped by :data:`_GROUPS`; a group is split only
    when it alone is wider than a table."""
    groups: dict[str, list[str]] = {}
    for c in columns:
        groups.setdefault(_group(c), []).append(c)
    out, current = [], []
    for cols in (groups[g] for g in _GROUPS if g in groups):
        if current and len(current) + len(cols) > width:
            out.append(current)
            current = []
        for c in cols:
            if len(current) == width:
                out.append(current)
                current = []
            current.append(c)
    return out + ([current] if current else [])


def _name(key) -> str:
    """A row name as a column header: its label if it is a known key, else the text."""
    return label(key) if key in LABELS else text(key)


def _row_name(name) -> str:
    """A row name in its cell: a model key as code, a number as it is."""
    name = str(name)
    return text(name) if name.replace(".", "", 1).isdigit() or "`" in name else f"`{name}`"


def _index_label(index: str | None) -> str:
    return text(INDEX_LABELS[index]) if index in INDEX_LABELS else label(index) if index else "Row"


def records_markdown(records, index: str | None = None) -> str:
    """A list of flat mappings, or a mapping of them (its keys name the rows), as tables.

    Columns with the same value in every row become one line above the tables; a row-name
    column (the mapping's keys, or a first column of distinct texts) is repeated in each table
    of at most :data:`MAX_COLUMNS` columns. Two or three rows with many columns are shown
    transposed (one column per row) instead.
    """
    keyed = isinstance(records, Mapping)
    rows = list(records.values()) if keyed else list(records)
    names = [str(k) for k in records] if keyed else None
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    if not keyed and cols and all(isinstance(r.get(cols[0]), str) for r in rows) \
            and len({r[cols[0]] for r in rows}) == len(rows):
        index, names, cols = cols[0], [r[cols[0]] for r in rows], cols[1:]
    out = []
    if names is not None:  # a column repeating the row names says nothing
        cols = [c for c in cols if not all(str(r.get(c)) == n for n, r in zip(names, rows))]
    transposed = names is not None and len(rows) <= 3 and len(cols) + 1 > MAX_COLUMNS
    if len(rows) > 1:
        same = [c for c in cols if all(c in r for r in rows) and all(r[c] == rows[0][c] for r in rows)]
        if same and len(same) < len(cols):
            which = (and_list([_name(n) for n in names]) if transposed
                     else "every " + _index_label(index).lower() if names is not None else "every row")
            out.append(f"Same for {which}: " + "; ".join(f"{label(c)}: {value_text(rows[0][c], c)}"
                                                          for c in same) + ".\n")
            cols = [c for c in cols if c not in same]
    if transposed:
        header = ["Quantity"] + [_name(n) for n in names]
        body = [[label(c)] + [value_text(r.get(c), c) for r in rows] for c in cols]
        out.append(table(header, body, [False] + [all(_numeric(r.get(c)) for c in cols) for r in rows]))
        return "\n".join(out)
    width = MAX_COLUMNS - (names is not None)
    for part in _chunks(cols, width) or [[]]:
        header = ([_index_label(index)] if names is not None else []) + [label(c) for c in part]
        body = [([_row_name(n)] if names is not None else [])
                + [value_text(r.get(c), c) for c in part] for n, r in zip(names or [None] * len(rows), rows)]
        right = ([False] if names is not None else []) + [all(_numeric(r.get(c)) for r in rows) for c in part]
        if header:
            out.append(table(header, body, right))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# summaries: sentences computed from a report
# ---------------------------------------------------------------------------------------------

def _rows(v) -> list[Mapping]:
    """The mappings of a list, or of a mapping's values; nothing for any other value."""
    items = v.values() if isinstance(v, Mapping) else v if isinstance(v, list) else []
    return [r for r in items if isinstance(r, Mapping)]


def span(values) -> str:
    """``lo–hi`` of numbers as :func:`number` writes them (one number when both read the same)."""
    lo, hi = number(min(values)), number(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def and_list(items: list[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _tolerance(name: str, report: Mapping) -> float | None:
    own = _num(report.get("tolerance"))
    return own if own is not None else TARGETS.get(name, {}).get("tolerance")


def _against(value: float, tolerance: float | None, unit: str = "") -> str:
    if tolerance is None:
        return ""
    verdict = "within" if value <= tolerance else "beyond"
    return f", {verdict} the tolerance of {number(tolerance)}{unit}"


def _families(rows: list[tuple[str, float]]) -> str:
    """``lo–hi for the 3 chgnet models and x for diep``: values grouped by the model key's first
    word, largest first."""
    groups: dict[str, list[tuple[str, float]]] = {}
    for model, v in rows:
        groups.setdefault(model.split("-")[0], []).append((model, v))
    parts = []
    for family, members in sorted(groups.items(), key=lambda g: -max(v for _, v in g[1])):
        who = text(members[0][0]) if len(members) == 1 else f"the {len(members)} {text(family)} models"
        parts.append(f"{span([v for _, v in members])} for {who}")
    return and_list(parts)


def summary_extraction(report: Mapping) -> list[str]:
    rows = [(str(r.get("model", f"row {i + 1}")), r) for i, r in enumerate(_rows(report.get("results")))]

    def column(key):
        return [(m, _num(r.get(key))) for m, r in rows if _num(r.get(key)) is not None]

    out = []
    baseline = text(report.get("baseline") or "the baseline")
    speedup, batching, with_workers = column("speedup"), column("speedup_of_batching"), column("speedup_with_workers")
    if speedup:
        slower = " (a factor below 1: slower than the loop)" if min(v for _, v in speedup) < 1 else ""
        out.append(f"Against the {baseline}, the batched, energy-only pass is faster by a factor of "
                   f"{_families(speedup)}{slower}.")
    if batching:
        line = (f"Batching by itself accounts for a factor of {span([v for _, v in batching])} "
                "(one structure per pass against a batch)")
        if speedup and max(v for _, v in batching) < 1.5 < max(v for _, v in speedup):
            line += "; the rest of the gain is the energy-only pass, which skips the forces the calculator computes"
        out.append(line + ".")
    gains = [_num(r.get("batched_s")) / _num(r.get("workers_s")) for _, r in rows
             if _num(r.get("batched_s")) and _num(r.get("workers_s"))]
    workers = sorted({int(w) for _, w in column("workers")})
    if with_workers:
        procs = f"{span(workers)} worker processes" if workers else "worker processes"
        gain = f" adds a factor of {span(gains)} to the batched pass;" if gains else ""
        out.append(f"Running the batches in {procs}{gain} the speed-up over the loop is then "
                   f"{_families(with_workers)}.")
    diffs = column("max_energy_diff_eV_per_atom")
    if diffs:
        model, worst = max(diffs, key=lambda mv: mv[1])
        out.append(f"Energies agree with the calculator's to {number(worst)} eV/atom at worst ({text(model)})"
                   f"{_against(worst, _tolerance('extraction', report), ' eV/atom')}.")
    target = TARGETS["extraction"].get("speedup")
    best = max([(v, m, "") for m, v in speedup] + [(v, m, ", with workers") for m, v in with_workers], default=None)
    if target and best:
        verdict = "meets" if best[0] >= target else "falls short of"
        out.append(f"The best speed-up, {number(best[0])} ({text(best[1])}{best[2]}), {verdict} the "
                   f"design's target of {number(target)}.")
    return out


def summary_reconstruction(report: Mapping) -> list[str]:
    parts = {k: v for k, v in report.items() if isinstance(v, Mapping) and _num(v.get("speedup")) is not None}
    out, worst = [], []
    for key, part in parts.items():
        size = [f"{number(part[k])} {w}" for k, w in (("models", "models"), ("pairs", "pairs"), ("atoms", "atoms"))
                if _num(part.get(k)) is not None]
        what = f"the whole {label(key)} matrix" + (f" ({', '.join(size)})" if size else "")
        out.append((what, number(part["speedup"])))
        rel = next((_num(v) for k, v in part.items() if str(k).startswith("max_rel_diff") and _num(v) is not None),
                   None)
        if rel is not None:
            worst.append((rel, key, _num(part.get("max_abs_diff"))))
    lines = []
    if out:
        first, rest = out[0], out[1:]
        line = f"Computing {first[0]} is {first[1]} times as fast as scikit-matter called once per pair"
        lines.append(line + "".join(f"; {w} {s} times" for w, s in rest) + ".")
    if worst:
        rel, key, absolute = max(worst, key=lambda w: w[0])
        extra = f", {number(absolute)} absolute" if absolute is not None else ""
        lines.append(f"The largest difference from scikit-matter is {number(rel)} relative ({label(key)}{extra})"
                     f"{_against(rel, _tolerance('reconstruction', report))}.")
    return lines


def summary_pooling(report: Mapping) -> list[str]:
    orders = report.get("orders")
    orders = orders if isinstance(orders, Mapping) else {}
    speed = {k: _num(v.get("speedup")) for k, v in orders.items() if isinstance(v, Mapping)}
    speed = {k: v for k, v in speed.items() if v is not None}
    out = []
    if speed:
        size = [f"{number(report[k])} {w}" for k, w in (("atoms_per_structure", "atoms each"), ("dim", "features"))
                if _num(report.get(k)) is not None]
        n = f" of {number(report['n_structures'])} structures" if _num(report.get("n_structures")) else ""
        out.append(f"Vectorised cumulants{n}{' (' + ', '.join(size) + ')' if size else ''} are "
                   f"{span(speed.values())} times as fast as a per-structure scipy loop "
                   f"(cumulant order{'s' if len(speed) > 1 else ''} {and_list([text(k) for k in speed])}).")
    rel = [(_num(v.get("max_abs_diff")) / _num(v.get("max_abs_value")), k) for k, v in orders.items()
           if isinstance(v, Mapping) and _num(v.get("max_abs_diff")) is not None and _num(v.get("max_abs_value"))]
    if rel:
        worst, order = max(rel)
        out.append(f"The largest difference from the loop is {number(worst)} of the largest value (order "
                   f"{text(order)}){_against(worst, _tolerance('pooling', report))}.")
    return out


def summary_memory(report: Mapping) -> list[str]:
    peak, budget, inputs = (_num(report.get(k)) for k in ("peak_rss_gb", "budget_gb", "inputs_gb"))
    if peak is None:
        return []
    scale = [f"{number(report[k])} {w}" for k, w in (("atoms", "atoms"), ("models", "models"), ("dim", "features"))
             if _num(report.get(k)) is not None]
    line = "The full GFRE matrix" + (f" of {' × '.join(scale)}" if scale else "") + \
        f" peaks at {number(peak)} GB of resident memory"
    if budget:
        verdict = "within" if peak <= budget else "over"
        line += f", {verdict} the {number(budget)} GB budget ({number(100 * peak / budget)} % of it)"
    out = [line + "."]
    if inputs:
        out.append(f"That is {number(peak / inputs)} times the size of the inputs ({number(inputs)} GB).")
    seconds, pairs = _num(report.get("seconds")), _num(report.get("pairs"))
    if seconds is not None:
        of = f" of {number(report['pairs'])} pairs" if pairs is not None else ""
        finite = {True: "; every value is finite", False: "; some values are not finite"}.get(report.get("finite"), "")
        out.append(f"The matrix{of} took {number(seconds)} s{finite}.")
    return out


def _scaling_rows(report: Mapping) -> list[Mapping]:
    rows = [r for r in report.get("results") or [] if isinstance(r, Mapping)
            and _num(r.get("atoms")) and _num(r.get("seconds")) is not None and _num(r.get("peak_rss_gb")) is not None]
    return sorted(rows, key=lambda r: r["atoms"])


def summary_scaling(report: Mapping) -> list[str]:
    rows = _scaling_rows(report)
    if not rows:
        return []
    first, last = rows[0], rows[-1]
    shape = [f"{number(first[k])} {w}" for k, w in (("models", "models"), ("dims", "features each"))
             if _num(first.get(k)) is not None]
    out = [f"The streamed GFRE matrix{' of ' + ' × '.join(shape) if shape else ''} took "
           f"{number(first['seconds'])} s at {number(first['atoms'])} atoms and {number(last['seconds'])} s at "
           f"{number(last['atoms'])} ({number(1e6 * last['seconds'] / last['atoms'])} µs per atom; "
           f"{number(1e6 * first['seconds'] / first['atoms'])} at the smallest size, where fixed costs weigh)."]
    line = f"Peak resident memory went from {number(first['peak_rss_gb'])} to {number(last['peak_rss_gb'])} GB"
    if _num(last.get("inputs_gb")):
        line += f" while the inputs grew to {number(last['inputs_gb'])} GB"
    budget = _num((report.get("settings") or {}).get("budget_gb")) if isinstance(report.get("settings"), Mapping) else None
    if budget:
        line += f"; at the largest size {'within' if last['peak_rss_gb'] <= budget else 'over'} the " \
                f"{number(budget)} GB budget"
    out.append(line + ".")
    eq = report.get("equality")
    if isinstance(eq, Mapping) and _num(eq.get("max_rel_diff")) is not None:
        rel = _num(eq["max_rel_diff"])
        text_ = f"At {number(eq.get('atoms', 0))} atoms the values equal the in-memory engine's to {number(rel)} " \
                f"relative{_against(rel, _tolerance('scaling', report))}"
        if _num(eq.get("memory_peak_rss_gb")) is not None and _num(eq.get("memory_seconds")) is not None:
            text_ += f"; the in-memory engine took {number(eq['memory_seconds'])} s and peaked at " \
                     f"{number(eq['memory_peak_rss_gb'])} GB"
        out.append(text_ + ".")
    return out + _lfre_scaling(report)


def summary_small_panel(report: Mapping) -> list[str]:
    out = summary_reconstruction(report)
    target, part = _num(report.get("target_speedup")), report.get("gfre")
    if target and isinstance(part, Mapping) and _num(part.get("speedup")) is not None:
        verdict = "meets" if part["speedup"] >= target else "falls short of"
        out.append(f"The speed-up, {number(part['speedup'])}, {verdict} the design's target of {number(target)} "
                   "for a small panel.")
    return out


def _lfre_scaling(report: Mapping) -> list[str]:
    rows = sorted((r for r in _rows(report.get("lfre_results")) if _num(r.get("atoms")) and
                   _num(r.get("seconds")) is not None and _num(r.get("peak_rss_gb")) is not None),
                  key=lambda r: r["atoms"])
    if not rows:
        return []
    first, last = rows[0], rows[-1]
    test = f" for {number(last['test_atoms'])} test atoms" if _num(last.get("test_atoms")) else ""
    out = [f"The streamed LFRE matrix{test} took {number(first['seconds'])} s at {number(first['atoms'])} atoms and "
           f"{number(last['seconds'])} s at {number(last['atoms'])}, peaking at {number(max(r['peak_rss_gb'] for r in rows))} "
           "GB of resident memory (the neighbour search reads every training atom once per split)."]
    eq = report.get("lfre_equality")
    if isinstance(eq, Mapping) and _num(eq.get("max_rel_diff")) is not None:
        rel = _num(eq["max_rel_diff"])
        out.append(f"At {number(eq.get('atoms', 0))} atoms its values equal the in-memory engine's to {number(rel)} "
                   f"relative{_against(rel, _tolerance('scaling', report))}.")
    return out


def summary_cluster_extraction(report: Mapping) -> list[str]:
    out = []
    for model, r in sorted((report.get("results") or {}).items()):
        if not isinstance(r, Mapping) or _num(r.get("dask_speedup")) is None:
            continue
        line = f"{text(model)}: a local Dask cluster of 2 workers extracted {number(r.get('structures', 0))} " \
               f"structures in {number(r['dask_local_2_s'])} s against {number(r['one_process_s'])} s in one process " \
               f"(a factor of {number(r['dask_speedup'])}"
        if _num(r.get("forked_speedup")) is not None:
            line += f"; two forked workers: {number(r['forked_speedup'])}"
        line += ")"
        if _num(r.get("dask_speedup_cold")) is not None:
            line += f"; {number(r['dask_speedup_cold'])} with the cluster's start-up and each worker loading the model"
        if "identical" in r:
            line += "; the entries are " + ("byte-identical" if r["identical"] is True else "NOT byte-identical") + \
                " to the one-process run's"
        out.append(line + ".")
    return out


def scaling_svg(report: Mapping, width: int = 640, height: int = 250) -> str:
    """The scaling curves as an inline SVG: time per atom and peak memory against atoms (log axes)."""
    rows = _scaling_rows(report)
    if len(rows) < 2:
        return ""
    panels = [("Time per atom (µs)", [1e6 * r["seconds"] / r["atoms"] for r in rows]),
              ("Peak resident memory (GB)", [r["peak_rss_gb"] for r in rows])]
    xs = [math.log10(r["atoms"]) for r in rows]
    pw, ph, left, top = width / 2 - 100, height - 80, 60, 20  # room for the last tick label
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'viewBox="0 0 {width} {height}" style="max-width:100%;height:auto;font:12px sans-serif">',
             "<title>Streamed GFRE matrix: time per atom and peak resident memory against the number of atoms "
             "(logarithmic axes)</title>"]
    for p, (name, ys) in enumerate(panels):
        x0 = left + p * (width / 2)
        ly = [math.log10(max(y, 1e-12)) for y in ys]
        lo, hi = math.floor(min(ly)), math.ceil(max(ly))
        hi = hi if hi > lo else lo + 1

        def px(v, x0=x0):
            return x0 + (v - xs[0]) / ((xs[-1] - xs[0]) or 1) * pw

        def py(v, lo=lo, hi=hi):
            return top + ph - (v - lo) / (hi - lo) * ph

        parts.append(f'<rect x="{x0}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
        for e in range(lo, hi + 1):
            parts.append(f'<text x="{x0 - 6}" y="{py(e) + 4:.1f}" text-anchor="end">{number(10.0 ** e)}</text>')
        for x, r in zip(xs, rows):
            parts.append(f'<text x="{px(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{number(r["atoms"])}</text>')
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ly))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="#1f77b4"><title>{number(r["atoms"])} atoms: '
                  f'{number(v)}</title></circle>' for x, y, v, r in zip(xs, ly, ys, rows)]
        parts.append(f'<text x="{x0 + pw / 2:.1f}" y="{top + ph + 34}" text-anchor="middle">atoms</text>')
        parts.append(f'<text x="{x0 + pw / 2:.1f}" y="{top + ph + 52}" text-anchor="middle" font-weight="bold">'
                     f'{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def summary_generic(report: Mapping) -> list[str]:
    """For a benchmark without its own summary: the range of every ``speedup`` in the report."""
    found = []

    def walk(v):
        if isinstance(v, Mapping):
            for k, x in v.items():
                if k == "speedup" and _num(x) is not None:
                    found.append(_num(x))
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(report)
    return [f"Speed-up over the baseline: {span(found)} ({len(found)} measurement{'s' * (len(found) > 1)})."] \
        if found else []


#: Benchmark name -> the function writing its summary sentences from its report.
SUMMARIES: dict[str, Callable[[Mapping], list[str]]] = {
    "extraction": summary_extraction, "reconstruction": summary_reconstruction,
    "pooling": summary_pooling, "memory": summary_memory, "scaling": summary_scaling,
    "cluster_extraction": summary_cluster_extraction, "small_panel": summary_small_panel,
}


def summary(name: str, report: Mapping) -> list[str]:
    """The summary sentences of one report; a field of an unexpected shape leaves a sentence out."""
    fn = SUMMARIES.get(name) or SUMMARIES.get(str(report.get("benchmark")), summary_generic)
    try:
        return fn(report) or summary_generic(report)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        return [f"No summary: the report has a field of an unexpected shape ({text(type(exc).__name__)}: "
                f"{text(exc)})."]


# ---------------------------------------------------------------------------------------------
# pages
# ---------------------------------------------------------------------------------------------

def run_line(run) -> str:
    """Where and when a report was measured, in one line (from its ``run`` entry)."""
    if not isinstance(run, Mapping) or not run:
        return "*The report does not say where or when it was measured.*"
    parts = []
    if run.get("date_utc"):
        parts.append(f"on {text(run['date_utc'])} UTC")
    if run.get("git_commit"):
        parts.append(f"at commit `{str(run['git_commit']).replace('`', '')}`")
    machine = [text(run["cpu"])] if run.get("cpu") else []
    for key, what in (("logical_cores", "logical core"), ("torch_threads", "torch thread")):
        if _num(run.get(key)) is not None:
            machine.append(f"{number(run[key])} {what}{'' if run[key] == 1 else 's'}")
    if "gpu" in run:
        machine.append(f"GPU {text(run['gpu'])}" if run["gpu"] else "no GPU")
    known = {"date_utc", "git_commit", "cpu", "logical_cores", "torch_threads", "gpu"}
    machine += [f"{label(k)} {value_text(v, str(k))}" for k, v in run.items() if k not in known]
    return "*Measured " + " ".join(parts) + (": " if parts and machine else "") + ", ".join(machine) + ".*"


def benchmark_markdown(name: str, report: Mapping, level: int = 3) -> str:
    """One benchmark report as Markdown: heading, run line, summary, tables.

    Top-level flat values (and small flat mappings such as versions) go into one two-column
    table; several flat mappings of many entries (the GFRE and LFRE parts) into one table with
    a column each; a list or mapping of records into :func:`records_markdown`'s tables;
    anything deeper into a JSON block.
    """
    out = [f"{'#' * level} {text(TITLES[name]) if name in TITLES else label(name)}\n"]
    if not isinstance(report, Mapping):
        return "\n".join(out + ["The report is not a JSON object:\n", f"```json\n{json.dumps(report)}\n```\n"])
    out.append(run_line(report.get("run")) + "\n")
    lines = summary(name, report)
    if lines:
        out.append("\n".join(f"- {line}" for line in lines) + "\n")
    if name == "scaling" and scaling_svg(report):
        out.append(scaling_svg(report) + "\n")
    settings, parts, blocks = [], {}, []
    for key, value in report.items():
        if key in ("run", "benchmark"):
            continue
        if _flat(value) or (isinstance(value, Mapping) and len(value) <= 4 and all(
                _flat(v) and not isinstance(v, (list, tuple)) for v in value.values())):
            settings.append((key, value))
        elif isinstance(value, Mapping) and value and all(_flat(v) for v in value.values()):
            parts[key] = value
        elif _records(value):
            blocks.append(f"**{RECORD_TITLES.get((name, key), label(key))}**\n\n"
                          + records_markdown(value, index=str(key)))
        else:
            blocks.append(f"**{label(key)}**\n\n```json\n{json.dumps(value, indent=2, default=str)}\n```\n")
    if lines and isinstance(report.get("baseline"), str) and any(text(report["baseline"]) in x for x in lines):
        settings = [(k, v) for k, v in settings if k != "baseline"]  # the summary names it
    if settings:
        settings.sort(key=lambda kv: _GROUPS.index(_group(str(kv[0]))))
        rows = [[label(k), value_text(v, str(k))] for k, v in settings]
        out.append(table(["Quantity", "Value"], rows))
    if len(parts) == 1:
        (key, value), = parts.items()
        out.append(f"**{label(key)}**\n\n" + table(["Quantity", "Value"],
                                                    [[label(k), value_text(v, str(k))] for k, v in value.items()]))
    elif parts:
        out.append(records_markdown(parts, index="part"))
    return "\n".join(out + blocks)


def _ordered(reports: Mapping) -> list[str]:
    """Report names in the order of :data:`TITLES`, then any others alphabetically."""
    return sorted(reports, key=lambda n: (list(TITLES).index(n) if n in TITLES else len(TITLES), n))


def benchmarks_markdown(reports: Mapping[str, Mapping], reference: Mapping[str, Mapping] | None = None) -> str:
    """The page part of the committed reference reports and of this machine's reports, by name.

    Parameters
    ----------
    reports : mapping of name -> report
        ``benchmarks/results/*.json``, written by ``make benchmark`` on the machine building the
        book (ignored by git). A report equal to its reference is named, not repeated.
    reference : mapping of name -> report, optional
        ``benchmarks/reference/*.json``: reports committed with the code, each naming the commit,
        date and machine that measured it (its ``run`` entry).
    """
    reference = reference or {}
    out = []
    if reference:
        out.append("## Reference measurements\n")
        out.append("Measured with the benchmark scripts of the commit named under each heading and "
                   "committed in `benchmarks/reference/`.\n")
        out += [benchmark_markdown(name, reference[name]) for name in _ordered(reference)]
    new = {k: v for k, v in reports.items() if reference.get(k) != v}
    out.append("## Measured on the machine that built this site\n")
    if not reports:
        out.append("This site was built without running the benchmarks. To measure them on your machine, run "
                   "`make benchmark` (it writes one report per benchmark to `benchmarks/results/`) and build "
                   "the site again with `make book`: the measurements then appear here"
                   + (", beside the reference ones above.\n" if reference else ".\n"))
    if reports.keys() - new.keys():
        out.append("The same as the reference measurements: "
                   + and_list([text(TITLES[k]) if k in TITLES else label(k) for k in sorted(reports.keys() - new.keys())]) + ".\n")
    out += [benchmark_markdown(name, new[name]) for name in _ordered(new)]
    return "\n".join(out)


def read_benchmarks(folder: str | Path) -> dict[str, dict]:
    """The ``*.json`` reports of a folder by file stem (none if the folder does not exist)."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"benchmark report {path} is not valid JSON ({exc}); rerun `make benchmark` "
                             "or delete the file") from exc
    return out
