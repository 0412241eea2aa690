"""benchmarks/multi_gpu.py (issue 23): per-worker busy time, end-of-job idle time and item split,
read from the job's rows; its smoke mode with four echo workers on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, text

from benchmarks import multi_gpu
from benchmarks.multi_gpu import ChunkRow, ItemRow, figures, union_seconds
from tests.conftest import POSTGRES_URL

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def test_union_seconds_counts_overlaps_once():
    assert union_seconds([]) == 0
    assert union_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)


def test_figures_from_rows():
    # a: chunk 1 over [0, 4], chunk 3 over [4.5, 10] (the job's last); b: chunk 2 over [0.5, 6], then nothing.
    chunks = [ChunkRow(1, "a", at(4)), ChunkRow(2, "b", at(6)), ChunkRow(3, "a", at(10))]
    items = [ItemRow("a", "a", 1, at(0), at(3)), ItemRow("a", "a", 1, at(1), at(4)),
             ItemRow("b", "b", 2, at(0.5), at(5.5)), ItemRow("b", "b", 2, at(0.5), at(6)),
             ItemRow("a", "a", 3, at(4.5), at(9)), ItemRow("a", "a", 3, at(7), at(9.5))]
    f = figures(items, chunks, processes=3)
    assert f["wall_s"] == 10
    a, b = f["workers"]
    assert (a["worker"], a["items"], a["chunks"], b["worker"], b["items"], b["chunks"]) == ("a", 4, 2, "b", 2, 1)
    assert a["busy_s"] == pytest.approx(9.5) and a["generating_s"] == pytest.approx(9.0)
    assert b["busy_s"] == pytest.approx(5.5) and b["start_lag_s"] == pytest.approx(0.5)
    assert a["idle_end_s"] == 0 and b["idle_end_s"] == pytest.approx(4) and b["idle_end_frac"] == pytest.approx(0.4)
    # The third process never got a chunk: idle the whole job.
    assert f["idle_workers"] == 1 and f["items_per_process"] == [4, 2, 0] and f["max_idle_end_s"] == 10
    # b ran out at 6; chunk 3's second item started at 7, queued behind a.
    assert f["hoarded_items"] == 1
    assert f["items_without_worker"] == 0 and f["items_off_chunk_worker"] == 0
    items.append(ItemRow("b", "a", 3, at(8), at(9)))  # written by b under a's chunk: flagged
    assert figures(items, chunks, processes=2)["items_off_chunk_worker"] == 1


def test_bad_arguments_are_one_line_usage_errors(monkeypatch, capsys):
    monkeypatch.delenv("LLMBATCH_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as exc:
        multi_gpu.parse_args(["--smoke", "--backend", "postgresql"])
    assert exc.value.code == 2 and "needs LLMBATCH_DATABASE_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        multi_gpu.parse_args(["--smoke", "--chunk-size", "0"])
    assert exc.value.code == 2


def _bench_schemas() -> set[str]:
    engine = create_engine(POSTGRES_URL)
    with engine.connect() as conn:
        names = set(conn.scalars(text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_%'")))
    engine.dispose()
    return names


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_smoke_four_echo_workers(backend, broker_url, monkeypatch, tmp_path):
    args = ["--smoke", "--gpus", "0,1,2,3", "--prompts", "240", "--chunk-size", "20", "--broker-url", broker_url,
            "--backend", backend, "--json-out", str(tmp_path / "out.json")]
    if backend == "postgresql":
        monkeypatch.setenv("LLMBATCH_DATABASE_URL", POSTGRES_URL)
        before = _bench_schemas()
        args.append("--skip-baseline")  # the baseline's path is the SQLite case's
    lines = multi_gpu.job_lines(multi_gpu.parse_args(args), None)
    echoed = sum(min(len(line["prompt"].split()), line["max_tokens"]) for line in lines)
    res = multi_gpu.main(args)
    runs = [res["many"]] + ([res["one"]] if res["one"] else [])
    for run, processes in zip(runs, (4, 1)):
        assert run["items"] == run["finished"] == 240 and run["chunks"] == 12
        # Every item has exactly one worker, the one that finished its chunk; the split covers them all.
        assert run["items_without_worker"] == 0 and run["items_off_chunk_worker"] == 0
        assert len(run["items_per_process"]) == processes and sum(run["items_per_process"]) == 240
        assert sum(w["chunks"] for w in run["workers"]) == 12
        wall = run["wall_s"]
        assert wall > 0 and run["output_tokens"] == echoed  # every line's words, up to its max_tokens
        for w in run["workers"]:
            assert 0 <= w["idle_end_s"] <= wall and 0 <= w["start_lag_s"] <= wall
            assert 0 <= w["busy_s"] <= wall + 1e-3 and 0 <= w["generating_s"] <= w["busy_s"] + 1e-3
        assert min(w["idle_end_s"] for w in run["workers"]) == 0  # whoever finished the last chunk
        devices = [w["device"] for w in run["workers"]]  # each process's CUDA_VISIBLE_DEVICES: one GPU each
        assert len(set(devices)) == len(devices) and set(devices) <= {"0", "1", "2", "3"}
        assert 0 <= run["max_idle_end_frac"] <= 1 and 0 <= run["hoarded_items"] <= 240
    if backend == "sqlite":
        assert res["one"]["workers"][0]["items"] == 240 and res["speedup"] > 0
    else:
        assert _bench_schemas() == before  # the run's schema is dropped


def _paced_run(feed_ahead):
    from benchmarks.feed_sim import PaceConfig, PacedEngine
    from llmbatch.worker.engine.types import Request, SamplingParams

    reqs = [Request(id=i, prompt="x", params=SamplingParams(max_tokens=4 + i % 13)) for i in range(640)]
    chunks = [reqs[k:k + 32] for k in range(32, 640, 32)]
    engine = PacedEngine(PaceConfig(slots=64, step_s=0.0002, ask_s=0.0, flush_s=0.0, feed_ahead=feed_ahead))
    results = [r for batch in engine.generate(reqs[:32], more=lambda: chunks.pop(0) if chunks else [])
               for r in batch]
    assert sorted(r.id for r in results) == list(range(640))  # each request once, fed ones too
    assert all(r.started_at <= r.finished_at and r.usage.completion_tokens == 4 + r.id % 13 for r in results)
    return engine


def test_paced_engine_feeds_like_the_scheduler_and_the_cap_bounds_what_it_hoards():
    # run_slots' policy: asks while fewer requests wait than it has slots, so it claims about a batch ahead.
    default = _paced_run(None)
    assert default.max_waiting >= 64 and default.claims == 19
    # The proposed cap: ask only while running + waiting < slots + 8.
    capped = _paced_run(8)
    assert capped.max_waiting < default.max_waiting and capped.max_waiting <= 64 + 8 + 32
    assert capped.claims == 19


def test_baseline_json_names_an_earlier_run(tmp_path, capsys):
    good = tmp_path / "one.json"
    good.write_text('{"many": {"output_tok_s": 10.0, "devices": ["0"]}}')
    args = multi_gpu.parse_args(["--smoke", "--skip-baseline", "--baseline-json", str(good)])
    assert args.baseline == {"output_tok_s": 10.0, "devices": ["0"]}
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(SystemExit) as exc:
        multi_gpu.parse_args(["--smoke", "--baseline-json", str(bad)])
    assert exc.value.code == 2 and "not a multi_gpu.py --json-out file" in capsys.readouterr().err
