"""Dataset loader for lmpress's offline tasks (called by lm-eval through `custom_dataset`)."""

import datasets


def load(task: str, **_: object) -> dict:
    from lmpress.evaluate.offline_tasks import load_task_docs

    return {"test": datasets.Dataset.from_list(load_task_docs(task))}
