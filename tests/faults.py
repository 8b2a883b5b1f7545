"""Faults injected into the Ray workers of a test cluster (tests only).

`ray.init(runtime_env={"worker_process_setup_hook": "faults.install", ...})` runs
`install` in every worker process; it wraps two real functions so that chosen rows
trigger a fault, and does nothing to any other row:

    FAIL_SEED     a batch holding a row with this seed makes the engine raise, as a
                  broken GPU would (a RuntimeError with CUDA's words)
    kill-*        the actor process SIGKILLs itself while writing the latent of a row
                  whose id starts with `kill-`, once per id (a marker file in
                  $MASKFACE_FAULT_DIR remembers), after that row's image is written and
                  before its batch's metrics: the batch must be redone on a restarted
                  actor without a duplicate metrics row
    die-*         the same, every time: a row that kills every actor that edits it (a
                  decoder that segfaults on its bytes), which no retry gets past
"""
from __future__ import annotations

import os
import signal

FAIL_SEED = 13013
ENGINE_ERROR = "CUDA error: an illegal memory access was encountered (injected)"


def _first_time(name: str) -> bool:
    folder = os.environ.get("MASKFACE_FAULT_DIR")
    if not folder:
        return False
    try:
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def install() -> None:
    from pipeline.engine.editor import Editor
    from pipeline.output.layout import Output

    edit, put = Editor.edit, Output.put

    def failing_edit(self, images, requests, *args, **kwargs):
        if any(r.seed == FAIL_SEED for r in requests):
            raise RuntimeError(ENGINE_ERROR)
        return edit(self, images, requests, *args, **kwargs)

    def killing_put(self, rel, data):
        name = rel.rsplit("/", 1)[-1]
        if rel.startswith("latents/kill-") and _first_time(name):
            os.kill(os.getpid(), signal.SIGKILL)
        if rel.startswith("latents/die-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return put(self, rel, data)

    Editor.edit = failing_edit
    Output.put = killing_put
