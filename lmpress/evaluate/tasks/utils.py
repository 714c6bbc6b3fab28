"""Dataset loader for lmpress's offline tasks (called by lm-eval through `custom_dataset`)."""

import datasets


def load(task: str, **_: object) -> dict:
    from lmpress.evaluate.offline_tasks import load_task_docs

    return {"test": datasets.Dataset.from_list(load_task_docs(task))}


WHOLE_CONTEXT_CHARS = 256  # whole passages must fit one window (no rolling in multiple choice)


def whole_choices(doc: dict) -> list[str]:
    """Each candidate as the whole passage it completes: the context's last lines (about
    WHOLE_CONTEXT_CHARS, starting at a line) + the candidate line."""
    context = doc["context"]
    cut = max(0, len(context) - WHOLE_CONTEXT_CHARS)
    if cut:
        newline = context.find("\n", cut)
        cut = newline + 1 if newline != -1 else cut
    return [context[cut:] + choice for choice in doc["choices"]]
