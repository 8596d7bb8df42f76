"""Tasks: what each kind of model brings to the one training loop (`guidedflow.train`).

A task builds its model, gives its loss `(model, batch, key) -> (loss, metrics)` and its
held-out metrics, and says what to do periodically and what to report at the end; the loop
owns everything else (state in shards, the step, EMA, schedule, logging, checkpoints,
preemption, teardown). A new model is a new task, never a new loop.

`base`: the `Task` interface; `generator`, `classifier`, `autoencoder`, `noisy_classifier`:
the tasks; `registry`: the tasks by name (`get_task`).
"""
