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


def test_smoke_json_and_n4_workloads(tmp_path):
    # issue 10: the engine against itself; n4 prefills each prompt once where lines prefill it 4 times.
    md = tmp_path / "RESULTS.md"
    res = throughput.main(["--smoke", "--cache-dir", os.environ["LLMBATCH_MODEL_CACHE"], "--workloads", "json,n4",
                           "--prompts", "4", "--results-md", str(md)])
    js, n4 = res["workloads"]["json"], res["workloads"]["n4"]
    assert js["constrained"]["errors"] == js["unconstrained"]["errors"] == 0 and js["ratio"] > 0
    assert js["constrained"]["output_tokens"] == js["unconstrained"]["output_tokens"] > 0  # lengths matched
    assert js["stop_valid"] == js["stop"]  # every stop-finished output validates
    assert n4["rows"] == 4 and n4["n4"]["output_tokens"] == n4["lines"]["output_tokens"] > 0
    assert n4["lines"]["prefill_tokens_computed"] == 4 * n4["n4"]["prefill_tokens_computed"]
    assert md.read_text().count("| json |") == md.read_text().count("| n4 |") == 1
