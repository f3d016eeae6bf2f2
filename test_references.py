# The stored references (bench/*.json: llama.cpp's, lm-eval's and TRL's numbers) and the package versions behind them:
# constraints-test.txt pins them, each file records what it was made with, and this environment must have them, or the
# tests that compare with those numbers would fail, or pass, for a reason that is not the code's (bench/pins.py)
import glob
import json
import os

import pytest

from bench import pins

REFERENCES = sorted(glob.glob(os.path.join(pins.ROOT, "bench", "*.json")))


def test_every_reference_records_the_pinned_versions():
    assert len(REFERENCES) >= 3, REFERENCES
    for path in REFERENCES:
        with open(path) as f:
            made_with = json.load(f).get("versions")
        assert made_with == pins.pins(), (f"{os.path.relpath(path, pins.ROOT)} was made with {made_with}, but the pins "
                                          f"say {pins.pins()}: regenerate it with the pinned versions, or move the pins")


@pytest.mark.parametrize("name", sorted(pins.pins()))
def test_this_environment_has_the_pinned_version(name):
    have, want = pins.installed(name), pins.pins()[name]
    if have is None:
        pytest.skip(f"{name} is not installed (the tests that need it skip too)")
    assert have == want, (f"{name} {have} is installed, but the stored references were made with {want}: "
                          f"pip install --no-deps {name}=={want}")


def test_the_pins_are_read_from_the_files(tmp_path, monkeypatch):
    # the parser takes "name==version" lines (markers and comments after them) and nothing else
    (tmp_path / "c.txt").write_text("# a comment\nfoo==1.2.3  # why\nBar_baz==0.1; python_version > '3'\nqux>=2\n-c x\n")
    (tmp_path / "r.txt").write_text("torch==9.9.9\nnumpy\n")
    monkeypatch.setattr(pins, "CONSTRAINTS", str(tmp_path / "c.txt"))
    monkeypatch.setattr(pins, "REQUIREMENTS", str(tmp_path / "r.txt"))
    assert pins.pins() == {"foo": "1.2.3", "bar_baz": "0.1", "torch": "9.9.9"}
    assert pins.record()["torch"] == pins.installed("torch") and pins.record()["foo"] is None
