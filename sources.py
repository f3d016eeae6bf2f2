"""
A config's sources by name: where each comes from on the Hub, where `hf download` puts it, and whether it is there.

A pretraining config (configs/smol135m.py) names, beside its `stages`, each source they mix:

    sources = {"fineweb-edu": dict(hub="HuggingFaceFW/fineweb-edu", files="data/*/*.parquet", text="text",
                                   filter="int_score>=3")}

hub: the dataset's id; files: a glob of its files, as the Hub lays them out (and `hf download --include` takes it);
text: the text column; filter: prepare.py --filter's rows (one, or a list). Source NAME's files are then
SOURCES_DIR/NAME/<files>. A post-training config names its chat data the same way (columns: messages, or chosen and
rejected). `python prepare.py --check CONFIG` says which are missing and how to fetch each; `python prepare.py --config
CONFIG --tokenizer TOK` prepares them all.
"""
import glob
import os

from rows import DataError, file_kind, iter_rows, parquet_file, parse_filter

SOURCES_DIR = "data_sources"  # source NAME's files: data_sources/NAME/<its files, as the Hub lays them out>
CHAT_COLUMNS = {"sft": ["messages"], "dpo": ["chosen", "rejected"]}


def config_data(config):
    # (data_dir, objective, {name: spec}) of a train.py config file: every source its stages mix (pretraining), or its
    # chat data (post-training), named in its `sources`
    import runpy
    if not os.path.isfile(config):
        raise DataError(f"{config}: no such config file")
    g = runpy.run_path(config)
    specs, objective = g.get("sources") or {}, g.get("objective", "pretrain")
    need = sorted({n for s in g.get("stages") or [] for n in s["weights"]}) if objective == "pretrain" else []
    missing = [n for n in need if n not in specs] or ([] if specs else ["its data"])
    if missing:
        raise DataError(f"{config}: its `sources` names no Hub dataset for {', '.join(missing)}; add e.g. sources = "
                        f"{{'web': dict(hub='HuggingFaceFW/fineweb-edu', files='data/*/*.parquet')}}")
    for name, s in specs.items():
        if not (isinstance(s, dict) and isinstance(s.get("hub"), str) and isinstance(s.get("files"), str)):
            raise DataError(f"{config}: sources[{name!r}] needs hub= (the dataset id) and files= (a glob of its files)")
    return g.get("data_dir"), objective, specs


def fetch_command(spec, name, sources_dir):
    return (f"hf download {spec['hub']} --repo-type dataset --include '{spec['files']}' --local-dir "
            f"{os.path.join(sources_dir, name)}")


def columns(path):
    # the column names of a .parquet file or of a .jsonl(.gz) file's first row
    if file_kind(path) == "parquet":
        return parquet_file(path).schema_arrow.names
    for _, row in iter_rows(path):
        return list(row) if isinstance(row, dict) else []
    return []


def check_config(config, sources_dir=SOURCES_DIR):
    """Says, per source of a config, whether its files are in sources_dir with the columns it reads (and if not, the
    command that fetches them), and whether data_dir has it prepared. Raises DataError when one is missing."""
    data_dir, objective, specs = config_data(config)
    bad = []
    for name, spec in specs.items():
        files = sorted(glob.glob(os.path.join(sources_dir, name, spec["files"]), recursive=True))
        need = CHAT_COLUMNS.get(objective, [spec.get("text", "text")])
        f = spec.get("filter") or []
        need += [parse_filter(x)[0] for x in ([f] if isinstance(f, str) else f)]
        lack = [c for c in need if files and c not in columns(files[0])]
        if not files or lack:
            bad.append(name)
            why = f"no column {', '.join(lack)} in {files[0]}" if files else f"no {spec['files']} in {sources_dir}/{name}"
            print(f"{name:>16}: missing ({why}); {spec.get('note') or 'fetch it: ' + fetch_command(spec, name, sources_dir)}")
            continue
        marker = os.path.join(data_dir, name, "meta.json") if objective == "pretrain" else os.path.join(data_dir, "chat.json")
        done = os.path.exists(marker)
        print(f"{name:>16}: {len(files):,} files, {sum(map(os.path.getsize, files)) / 1e9:,.2f} GB from {spec['hub']}"
              f"{' (prepared in ' + data_dir + ')' if done else ''}")
    if bad:
        raise DataError(f"{len(bad)} of {len(specs)} sources of {config} are missing in {sources_dir} ({', '.join(bad)}):"
                        f" fetch them as above, then python prepare.py --config {config} --tokenizer TOK")
    print(f"{config}: every source is in {sources_dir}; prepare them into {data_dir} with "
          f"python prepare.py --config {config} --tokenizer TOK")
    return specs
