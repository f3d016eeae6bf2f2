"""
The package versions behind the stored references (bench/*.json): constraints-test.txt pins them, each reference
records what it was made with (record(), called by the scripts that write them), and test_references.py checks that
the pins, the records and this environment agree.
"""
import os
import re
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(ROOT, "constraints-test.txt")
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")


def _exact(path):
    # {name: version} of the file's "name==version" lines
    out = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
            if m:
                out[m[1].lower()] = m[2]
    return out


def pins():
    # what the references depend on: constraints-test.txt's pins and requirements.txt's torch
    return {**_exact(CONSTRAINTS), "torch": _exact(REQUIREMENTS)["torch"]}


def installed(name):
    # this environment's version of a package (a local build's "+cpu" dropped), or None
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def record():
    # what a reference stores as its "versions": the installed version of every pinned package
    return {name: installed(name) for name in pins()}
