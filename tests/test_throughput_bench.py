"""The throughput benchmark's CPU smoke mode: every contender produces exactly the tokens asked for,
and on the CPU (float32 over the same NF4 weights) the engine's greedy tokens equal `generate`'s."""

from __future__ import annotations

import json
import os

from benchmarks import throughput


def test_smoke_runs_every_workload_and_the_engine_computes_what_generate_does(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "RESULTS.md"
    res = throughput.main(["--smoke", "--cache-dir", os.environ["LLMBATCH_MODEL_CACHE"],
                           "--workloads", "fixed,sampled,mixed,penalties,logprobs1", "--json-out", str(out), "--results-md", str(md)])
    assert json.loads(out.read_text())["workloads"].keys() == {"fixed", "sampled", "mixed", "penalties", "logprobs1"}
    w = res["workloads"]
    n, new = w["fixed"]["prompts"], 8  # --smoke: 6 prompts, 8 new tokens, EOS ignored
    for name in ("fixed", "sampled"):
        assert w[name]["engine"]["errors"] == 0
        assert w[name]["engine"]["output_tokens"] == w[name]["baseline"]["output_tokens"] == n * new
    # Greedy in float32: the paged engine and `generate` choose the same tokens, up to one near-tie of six.
    # On the CPU, bitsandbytes' 4-bit path gives slightly different numbers for the same row in a padded
    # batch of four and in the engine's own shapes; tests/test_engine.py compares at equal shapes, exactly.
    assert w["fixed"]["match32"] >= 0.83  # 5 of 6 (match_rate rounds to 4 places)
    # Mixed: one long line of 8x the tokens, all made, judged against fixed's engine.
    assert w["mixed"]["engine"]["output_tokens"] == (n - 1) * new + 8 * new
    assert "baseline" not in w["mixed"] and w["mixed"]["vs_fixed"] > 0
    # issue 19: fixed's prompts with a penalty line and a logprobs line: all made, no batch failed.
    assert w["penalties"]["engine"]["output_tokens"] == n * new and w["penalties"]["vs_fixed"] > 0
    assert all(w[k]["engine"]["batch_failures"] == 0 for k in w)
    # issue 18: one logprobs line among fixed's, and no workload read a step back before queuing the next.
    assert w["logprobs1"]["engine"]["output_tokens"] == n * new and w["logprobs1"]["vs_fixed"] > 0
    assert all(w[k]["engine"]["host_waits"] == 0 for k in w)
    # The first token comes from the prefill, the other 7 from decode steps; the async loop computes at
    # most one step too many per row (the step in flight when the row is seen to finish).
    s = w["fixed"]["engine"]["scheduler"]
    assert n * (new - 1) <= s["decode_tokens"] <= s["decode_slots"] <= n * new
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 20")]
    assert [r.split(" | ")[3] for r in rows] == ["fixed", "sampled", "mixed", "penalties", "logprobs1"]


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


def test_smoke_shared_prefix_workloads(tmp_path):
    """Workloads `shared` and `shared4` (issue 9): sharing on computes far fewer prompt tokens, same output."""
    md = tmp_path / "RESULTS.md"
    res = throughput.main(["--smoke", "--cache-dir", os.environ["LLMBATCH_MODEL_CACHE"], "--workloads",
                           "shared,shared4", "--prompts", "8", "--results-md", str(md)])
    for name, prefixes in (("shared", 1), ("shared4", 4)):
        w = res["workloads"][name]
        n = w["prompts"]  # --smoke keeps 6
        assert w["on"]["errors"] == w["off"]["errors"] == 0
        assert w["on"]["output_tokens"] == w["off"]["output_tokens"] == w["baseline"]["output_tokens"] == n * 8
        assert w["match32_on_off"] >= 0.83  # 5 of 6; float32 on the CPU: the same tokens, up to one near-tie (above)
        # Each distinct prefix is prefilled once instead of once per line.
        saved = w["off"]["prompt_tokens_computed"] - w["on"]["prompt_tokens_computed"]
        assert saved >= (n - prefixes) * (w["prefix_tokens"] - 16), (name, saved)
    assert md.read_text().count("| shared |") == md.read_text().count("| shared4 |") == 1
