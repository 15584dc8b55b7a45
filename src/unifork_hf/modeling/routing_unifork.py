"""Which path through the Y each sample takes: the per-sample task selector, and the rows of each task."""

import torch

# Task ids of the per-sample selector `task`.
UNDERSTANDING = 0
GENERATION = 1
TASKS = {"understanding": UNDERSTANDING, "generation": GENERATION}


def task_ids(task, batch_size: int, device) -> tuple[torch.Tensor, int | None]:
    """Normalise a task selector (None, "understanding"/"generation", a list of them, or 0/1 ids) to `(B,)`
    ids, and the batch's task if all its samples have the same one (else None)."""
    if task is None or isinstance(task, (str, int)):  # one task for the batch, known without reading a tensor
        only = UNDERSTANDING if task is None else TASKS.get(task, task)
        if only not in (UNDERSTANDING, GENERATION):
            raise ValueError(f"task must be 'understanding' or 'generation' (or 0/1), got {task!r}.")
        return torch.full((batch_size,), only, dtype=torch.long, device=device), only
    if isinstance(task, (list, tuple)):
        unknown = [t for t in task if isinstance(t, str) and t not in TASKS]
        if unknown:
            raise ValueError(f"task must be 'understanding' or 'generation' (or 0/1), got {unknown[0]!r}.")
        task = torch.tensor([TASKS.get(t, t) for t in task], device=device)
    task = torch.as_tensor(task, device=device).long().reshape(-1)
    if task.numel() == 1 and batch_size != 1:
        task = task.expand(batch_size)
    if task.shape[0] != batch_size:
        raise ValueError(f"task must have one entry per sample ({batch_size}), got {task.shape[0]}.")
    if ((task != UNDERSTANDING) & (task != GENERATION)).any():
        raise ValueError(f"task ids must be {UNDERSTANDING} (understanding) or {GENERATION} (generation).")
    first = int(task[0])
    return task, first if bool((task == first).all()) else None


def select_rows(value, rows: torch.Tensor):
    """The given samples of per-sample tensors, in dicts/tuples.

    Batch-1 broadcast tensors, None, and tensors when `rows` are all of them (`rows` is always sorted and
    unique) pass through as they are.
    """
    if isinstance(value, dict):
        return {key: select_rows(item, rows) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(select_rows(item, rows) for item in value)
    if isinstance(value, torch.Tensor) and value.shape[0] not in (1, rows.numel()):
        return value.index_select(0, rows)
    if value is not None and not isinstance(value, torch.Tensor):
        raise ValueError(f"A batch mixing both tasks cannot split a {type(value).__name__} attention mask.")
    return value


def merge_paths(states: dict, task: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per depth, each sample's hidden state on its own path through the Y: the embeddings and the shared
    layers' outputs (`states["shared"]`), then each branch depth's outputs (`states[task id]`, that task's rows)."""
    merged = list(states["shared"])
    for depth in range(max(len(states[UNDERSTANDING]), len(states[GENERATION]))):
        layer = torch.empty_like(merged[0])
        for task_id in (UNDERSTANDING, GENERATION):
            if states[task_id]:
                layer = layer.index_copy(0, (task == task_id).nonzero().squeeze(1), states[task_id][depth])
        merged.append(layer)
    return tuple(merged)
