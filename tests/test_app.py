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


def test_queue_is_named_after_the_model():
    assert queue_name("smollm2-135m-instruct") == "llmbatch.smollm2-135m-instruct"
    assert queue_name("meta-llama/Llama-3.1-8B-Instruct") == "llmbatch.meta-llama_Llama-3.1-8B-Instruct"
    assert queue_name("/models/My Model") == "llmbatch._models_My_Model"


def test_task_is_registered_under_a_stable_name():
    import llmbatch.worker.tasks  # noqa: F401

    assert TASK_RUN_CHUNK in app.tasks
    assert app.tasks[TASK_RUN_CHUNK].acks_late is True
