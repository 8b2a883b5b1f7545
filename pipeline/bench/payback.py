"""After how many edits a faster path's longer warm-up is bought back: within one bench
document (the default path against the plain one) or between two (`--payback`: an eager
and a compiled run, each in its own process)."""
from __future__ import annotations


def payback_edits(slower_run: dict, slower_warm_up_s: float, faster_run: dict,
                  faster_warm_up_s: float) -> float | None:
    """After how many edits a faster path's extra warm-up is paid back by its faster
    edits (0: it warms up no slower; None: its edits are not faster)."""
    extra = faster_warm_up_s - slower_warm_up_s
    saved = (slower_run["extrapolated_seconds_per_edit"]
             - faster_run["extrapolated_seconds_per_edit"])
    if extra <= 0:
        return 0.0
    return extra / saved if saved > 0 else None


def compare_documents(eager: dict, compiled: dict) -> dict:
    """Two bench documents of the same preset, mode, device and batch: each one's whole
    warm-up and extrapolated edit, and the edits after which the compiled one pays back.
    A ValueError says why two documents do not compare."""
    for name, r in (("eager", eager), ("compiled", compiled)):
        if "warm_up" not in r:
            raise ValueError(f"the {name} JSON has no warm_up (an older bench)")
    keys = [(r["preset"], r["mode"], r["env"]["device"], r["runs"]["default"][0]["batch"])
            for r in (eager, compiled)]
    if keys[0] != keys[1]:
        raise ValueError(f"the runs differ (preset, mode, device, batch): "
                         f"{keys[0]} against {keys[1]}")
    e_run, c_run = eager["runs"]["default"][0], compiled["runs"]["default"][0]
    e_warm = eager["warm_up"]["whole_s"]["default"]
    c_warm = compiled["warm_up"]["whole_s"]["default"]
    return {"warm_up_s": {"eager": e_warm, "compiled": c_warm},
            "seconds_per_edit": {"eager": e_run["extrapolated_seconds_per_edit"],
                                 "compiled": c_run["extrapolated_seconds_per_edit"]},
            "payback_edits": payback_edits(e_run, e_warm, c_run, c_warm)}
