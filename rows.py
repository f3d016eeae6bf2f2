"""
Rows and documents from files: the one reader every part of nanosmol uses (prepare.py for pretraining and chat data,
eval.py for task files). The bottom floor: it imports nothing of nanosmol.

    files, skipped = resolve_files("/data/fineweb/*.parquet")   # a file, a directory or a glob -> sorted paths
    for doc, nbytes in iter_documents(files, "text"): ...     # documents (text) for tokenizing
    iter_documents(files, "text", [parse_filter("int_score>=3")])  # rows whose columns pass every filter
    for line, row in iter_rows("tasks.jsonl"): ...            # whole rows (dicts) of .jsonl / .jsonl.gz / .json / .parquet

A source is .txt/.md/.py (one document per file), .jsonl/.jsonl.gz (one JSON object per line, a text field) or
.parquet (a text column).
"""
import glob
import gzip
import json
import operator
import os
import re

TEXT_EXTS = (".txt", ".md", ".py")  # one document per file


class DataError(Exception):
    """Bad input or bad data on disk; the message says what is wrong and how to fix it."""


# -----------------------------------------------------------------------------
# each document reader yields (document, bytes of input consumed), the bytes for a progress bar. A document is its
# text, or for .jsonl the raw line, parsed by the worker that tokenizes it (doc_text)


def file_kind(path):
    p = path.lower()
    if p.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(TEXT_EXTS):
        return "text"
    return None


def _unknown_type(path):
    return DataError(f"{path}: unknown file type. prepare.py reads {', '.join(TEXT_EXTS)} (one document per file), .jsonl "
                     f"or .jsonl.gz (one JSON object per line with a text field) and .parquet (a text column). Convert "
                     f"the file, or point --source at a directory or glob holding only those types.")


def resolve_files(spec):
    """A file, a directory (walked recursively; other file types are skipped and counted) or a glob -> sorted paths."""
    skipped = 0
    if any(c in spec for c in "*?["):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        for p in files:
            if file_kind(p) is None:
                raise _unknown_type(p)
    elif os.path.isdir(spec):
        files = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if file_kind(n) and not n.startswith("."):
                    files.append(os.path.join(root, n))
                else:
                    skipped += 1
    elif os.path.isfile(spec):
        if file_kind(spec) is None:
            raise _unknown_type(spec)
        files = [spec]
    else:
        raise DataError(f"{spec}: no such file or directory (or a glob that matched nothing)")
    if not files:
        raise DataError(f"{spec}: empty source, no {'/'.join(TEXT_EXTS)}/.jsonl/.jsonl.gz/.parquet files in it"
                        + (f" ({skipped} files of other types were skipped)" if skipped else ""))
    return files, skipped


def _read_jsonl(path, field, filters):
    # yields the raw lines: the JSON is parsed (and filtered) in the worker processes (doc_text), so one reader keeps
    # up with many
    with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
        raw = f.fileobj if isinstance(f, gzip.GzipFile) else f  # progress in bytes of the file on disk
        last = 0
        for lineno, line in enumerate(f, 1):
            pos = raw.tell()
            if line.strip():
                yield (line, path, lineno, field, filters), pos - last
                last = pos


FILTER_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}


def parse_filter(spec):
    """'int_score>=3' -> (column, op, value): the value is JSON where it reads as JSON (3, 0.5, true, "en"), else the
    text itself (en)."""
    m = re.fullmatch(r"\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(.*?)\s*", spec)
    if not m or not m.group(3):
        raise DataError(f"--filter {spec!r}: expected COLUMN OP VALUE, OP one of {' '.join(FILTER_OPS)} (e.g. "
                        f"--filter='int_score>=3' for FineWeb-Edu's educational score)")
    col, op, raw = m.groups()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw.strip("'")
    return col, op, value


def passes(row, filters, where):
    # whether the row's columns pass every filter; a missing value (null) passes none
    for col, op, value in filters:
        if col not in row:
            raise DataError(f"{where}: no column '{col}' to filter on (columns: {sorted(row)[:20]})")
        if row[col] is None:
            return False
        try:
            if not FILTER_OPS[op](row[col], value):
                return False
        except TypeError:
            raise DataError(f"{where}: --filter {col}{op}{value!r} compares {type(row[col]).__name__} values with a "
                            f"{type(value).__name__}; write the value as the column holds it (quoted for text)") from None
    return True


def doc_text(doc):
    # a document is its text, or a .jsonl line still to parse: (line, path, lineno, field, filters) -> None where the
    # row does not pass the filters
    if isinstance(doc, str):
        return doc
    line, path, lineno, field, filters = doc
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e}); .jsonl needs one JSON object per line") from None
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}:{lineno}: missing text field '{field}' (found: {keys}). Pass the right name with "
                        f"--text_field NAME")
    if filters and not passes(obj, filters, f"{path}:{lineno}"):
        return None
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field '{field}' is {type(text).__name__}, not a string")
    return text


def parquet_file(path):
    try:
        import pyarrow.parquet as pq  # only needed for .parquet files
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    return pq.ParquetFile(path)


def _read_parquet(path, field, filters, row_groups=None):
    pf = parquet_file(path)
    names = pf.schema_arrow.names
    cols = [field] + sorted({c for c, _, _ in filters} - {field})
    if field not in names:
        raise DataError(f"{path}: missing text column '{field}' (columns: {names}). Pass the right name with "
                        f"--text_field NAME")
    missing = [c for c in cols if c not in names]
    if missing:
        raise DataError(f"{path}: no column '{missing[0]}' to filter on (columns: {names})")
    meta = pf.metadata
    rows = max(1, meta.num_rows)
    groups = range(meta.num_row_groups) if row_groups is None else row_groups
    fcols = sorted({c for c, _, _ in filters})
    for g in groups:  # a row group at a time: memory stays that of one row group, whatever the file's size
        size = os.path.getsize(path) * meta.row_group(g).num_rows / rows
        for batch in pf.iter_batches(columns=cols, batch_size=1024, row_groups=[g]):
            text = batch.column(field)
            if filters:  # the filter's columns first: the text of a row that fails is never made a str
                values = {c: batch.column(c).to_pylist() for c in fcols}
                keep = [k for k in range(batch.num_rows) if passes({c: values[c][k] for c in fcols}, filters, path)]
                text = text.take(keep)
            for t in text.to_pylist():
                yield (t or ""), 0
        yield "", size  # the row group's bytes, for the progress bar (an empty document is dropped where tokenized)


def iter_rows(path):
    """Whole rows, not a text field: (line or row number, dict) of a .jsonl / .jsonl.gz / .parquet file, or of a .json
    file holding a list (or {"examples": [...]}); a .jsonl line that is not JSON comes as (line, JSONDecodeError) for
    the caller to report or count. chat.py's rows and eval.py's task files are read here."""
    if path.endswith(".parquet"):
        k = 0
        for batch in parquet_file(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                k += 1
                yield k, row
        return
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        if path.endswith(".json"):
            data = json.load(f)
            yield from enumerate(data if isinstance(data, list) else data.get("examples", data.get("data", [data])), 1)
            return
        for k, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield k, json.loads(line)
                except json.JSONDecodeError as e:
                    yield k, e


def iter_documents(files, field="text", filters=()):
    # files: paths, or (path, row groups) for part of a .parquet file
    for item in files:
        path, groups = item if isinstance(item, tuple) else (item, None)
        kind = file_kind(path)
        if kind == "text":
            if filters:
                raise DataError(f"{path}: --filter selects rows by their columns, and a {', '.join(TEXT_EXTS)} file is "
                                f"one document without columns; filter .jsonl or .parquet sources")
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read(), os.path.getsize(path)
        elif kind == "jsonl":
            yield from _read_jsonl(path, field, tuple(filters))
        else:
            yield from _read_parquet(path, field, tuple(filters), groups)
