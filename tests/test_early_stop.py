"""The early-stop rule alone: on target by the margin, and a recon plateau over the window."""
import torch

from pipeline.engine.early_stop import EarlyStop
from pipeline.engine.rows import EditRequest
from pipeline.engine.schedule import Schedule
from pipeline.engine.settings import EditConfig

OVERRIDES = {"early_stop.enabled": True, "early_stop.margin": 0.1, "early_stop.window": 20,
             "early_stop.every": 10, "early_stop.tolerance": 0.01, "steps.latent": 100,
             "loss.start_steps.classf": 10, "loss.start_steps.seg": 10,
             "dynamic_masking_iters": 10}


def rule(requests):
    settings = EditConfig.from_overrides(OVERRIDES).resolve(requests[0].attributes)
    schedule = Schedule.for_group(settings, [settings.loss.weights.seg] * len(requests),
                                  [r.size for r in requests])
    return EarlyStop(settings.early_stop, schedule, requests, torch.device("cpu"))


def test_an_image_is_done_once_on_target_by_the_margin_with_its_recon_flat():
    requests = [EditRequest(("smiling",), (1.0,)), EditRequest(("smiling",), (0.0,)),
                EditRequest(("smiling",), (1.0,)), EditRequest(("smiling",), (1.0,))]
    stop = rule(requests)
    first = stop.first
    assert first == 20 and not stop.due(first - 1) and stop.due(first) and stop.due(first + 10)
    rows = torch.arange(4)
    probs = torch.tensor([[0.7], [0.3], [0.55], [0.9]])   # on target; on target; short; on
    assert not stop.done(first, rows, probs, torch.tensor([1.0, 1.0, 1.0, 1.0])).any()
    stop.done(first + 10, rows, probs, torch.tensor([1.0, 1.0, 1.0, 0.5]))
    done = stop.done(first + 20, rows, probs, torch.tensor([1.005, 0.995, 1.0, 0.2]))
    # against the recon of 20 steps before: flat, flat, flat (but short of the margin), moving
    assert done.tolist() == [True, True, False, False]
