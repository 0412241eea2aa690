"""The throughput benchmark's CPU smoke mode runs and reports positive numbers (no speed asserted)."""

from __future__ import annotations

import json
import os

from benchmarks import throughput


def test_smoke_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "RESULTS.md"
    res = throughput.main(["--smoke", "--cache-dir", os.environ["LLMBATCH_MODEL_CACHE"],
                           "--json-out", str(out), "--results-md", str(md)])
    assert json.loads(out.read_text())["workloads"].keys() == {"fixed", "varied"}
    for name, w in res["workloads"].items():
        for contender in ("baseline", "engine") + (("single",) if name == "fixed" else ()):
            c = w[contender]
            assert c["output_tokens"] > 0 and c["output_tok_s"] > 0 and c["total_tok_s"] > 0 and c["wall_s"] > 0
            assert 0 <= c["padding_fraction"] < 1
        assert w["ratio"] > 0 and 0 <= w["match32"] <= 1
        assert w["engine"]["errors"] == 0
    assert res["workloads"]["fixed"]["engine"]["output_tokens"] == res["workloads"]["fixed"]["baseline"]["output_tokens"]
    assert md.read_text().count("| random") + md.read_text().count("| smollm2") == 2


def test_smoke_adapters_workload(tmp_path):
    """Workload `adapters` (issue 11): base-only engine, engine with four adapters, peft generate."""
    res = throughput.main(["--smoke", "--workloads", "adapters", "--prompts", "4", "--cache-dir",
                           os.environ["LLMBATCH_MODEL_CACHE"], "--adapter-dir", str(tmp_path / "adapters"),
                           "--results-md", str(tmp_path / "RESULTS.md")])
    w = res["workloads"]["adapters"]
    assert w["adapters"] == 4 and w["prompts"] == 4
    for name in ("engine_base", "engine_adapters", "peft"):
        assert w[name]["output_tokens"] == 4 * 8 and w[name]["output_tok_s"] > 0, name  # every row made 8 tokens
    assert w["engine_adapters"]["errors"] == 0 and w["engine_base"]["errors"] == 0
    assert w["vs_base"] > 0 and w["vs_peft"] > 0 and 0 <= w["match32"] <= 1
    assert "adapters (4 x rank 16" in (tmp_path / "RESULTS.md").read_text()
