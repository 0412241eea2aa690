"""The installed distribution: everything lives under `llmbatch.`; no generic top-level name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_real_install_exposes_only_the_llmbatch_namespace(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top == {"llmbatch"}, top
    # From a directory other than the repository, with only the install on the path.
    probe = ("import importlib.util as u, llmbatch.jobs.cli, llmbatch.worker.app, llmbatch.jobs.db as d;"
             "assert d.MIGRATIONS_DIR.joinpath('versions').is_dir(), d.MIGRATIONS_DIR;"
             # The dashboard's templates ship with the package, and load from the install.
             "import llmbatch.jobs.api.dashboard as dash; assert dash.__file__.startswith(sys.path[0]), dash.__file__;"
             "dash.TEMPLATES.get_template('index.html'); dash.TEMPLATES.get_template('job.html');"
             # The CUDA NF4 kernel's source, which workers compile at first use.
             "import llmbatch.worker.engine.nf4_mma as m; assert m.source().startswith('// Our NF4'), m.SOURCE;"
             "print([n for n in ('jobs', 'worker', 'migrations') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
