"""The Celery app's reliability settings, and how work is routed."""

from llmbatch.worker.app import TASK_RUN_CHUNK, app, make_app, queue_name


def test_json_only_late_acks_prefetch_one():
    conf = make_app("redis://127.0.0.1:6379/9").conf
    assert conf.task_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True and not conf.result_backend


def test_queue_names_are_readable_and_distinct_for_every_model_name():
    names = ["smollm2-135m-instruct", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama_Llama-3.1-8B-Instruct",
             "a/b", "a_b", "a b", "/models/My Model", "/models/My_Model", "x" * 300, "x" * 299 + "y"]
    queues = [queue_name(n) for n in names]
    assert len(set(queues)) == len(names), "two models share a queue"
    assert queue_name("meta-llama/Llama-3.1-8B-Instruct").startswith("llmbatch.meta-llama_Llama-3.1-8B-Instruct.")
    assert all(q == queue_name(n) for q, n in zip(queues, names))  # stable: submit and worker agree
    assert all(len(q) < 200 and " " not in q and "/" not in q for q in queues)


def test_task_is_registered_under_a_stable_name():
    import llmbatch.worker.tasks  # noqa: F401

    assert TASK_RUN_CHUNK in app.tasks
    assert app.tasks[TASK_RUN_CHUNK].acks_late is True
