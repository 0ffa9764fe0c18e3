"""pyflakes over every script and test: no undefined name, unused import or variable, or
f-string without a placeholder lands."""
import glob
import io
import os

from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyflakes_finds_nothing():
    files = sorted(glob.glob(os.path.join(ROOT, '*.py')) +
                   glob.glob(os.path.join(ROOT, 'tests', '*.py')))
    assert len(files) > 20
    out, err = io.StringIO(), io.StringIO()
    found = sum(checkPath(f, Reporter(out, err)) for f in files)
    assert found == 0 and not err.getvalue(), out.getvalue() + err.getvalue()


def test_it_would_see_one(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('import os\nprint(undefined_name, f"no placeholder")\n')
    out = io.StringIO()
    assert checkPath(str(bad), Reporter(out, io.StringIO())) == 3, out.getvalue()
