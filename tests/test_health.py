"""The on-device health record: a blow-up fails its own image, in words, and no other."""
import torch

from pipeline.engine.health import Health


def test_a_blow_up_is_recorded_once_for_its_image_and_worded():
    h = Health(3, torch.device("cpu"))
    finite = torch.ones(3)
    h.update("latent", 4, {"recon": finite, "classf": torch.tensor([1.0, float("nan"), 1.0])})
    h.update("latent", 5, {"recon": torch.tensor([1.0, float("inf"), 1.0])},
             latent=torch.tensor([[0.0], [0.0], [float("nan")]]))
    assert h.ok.tolist() == [True, False, False]
    assert h.errors() == [
        None,
        "numeric blow-up in the latent phase at step 4: classf not finite",   # the first one
        "numeric blow-up in the latent phase at step 5: latent not finite"]
    assert h.masked_sum(torch.tensor([2.0, float("nan"), 3.0])) == 2.0


def test_failed_images_keep_their_parameters_and_a_part_hands_its_record_back():
    h = Health(4, torch.device("cpu"))
    rows = torch.tensor([1, 3])
    part = h.take(rows)                                       # early stopping's smaller batch
    part.update("noise", 2, {"n_loss": torch.tensor([float("nan"), 0.5])})
    p = torch.zeros(2, 3, requires_grad=True)
    p.grad = torch.ones(2, 3)
    part.zero_failed_grads([p])
    assert p.grad.tolist() == [[0.0] * 3, [1.0] * 3]
    h.put(rows, part)
    assert h.ok.tolist() == [True, False, True, True]
    assert h.errors()[1] == "numeric blow-up in the noise phase at step 2: n_loss not finite"
