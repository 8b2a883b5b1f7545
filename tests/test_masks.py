"""The masks from parser probabilities, dynamic growth and the blend, on hand-made
probabilities where each class owns a known block of the image."""
import torch

from models.face_parser import CLASSES
from pipeline.engine.masks import blend, grow_masks, initial_masks, mask_regions
from pipeline.engine.rows import EditRequest
from pipeline.engine.settings import EditConfig

S = 8


def probs_with(blocks: dict[str, slice]) -> torch.Tensor:
    """[1, 9, S, S]: each named class certain on its rows, the background elsewhere."""
    p = torch.zeros(1, len(CLASSES), S, S)
    p[0, 0] = 1.0
    for name, rows in blocks.items():
        p[0, :, rows] = 0.0
        p[0, CLASSES.index(name), rows] = 1.0
    return p


FACE = probs_with({"hair": slice(0, 2), "skin": slice(2, 5), "mouth": slice(5, 6),
                   "ears": slice(6, 7)})


def regions(attributes, **kwargs):
    request = EditRequest(attributes, (1.0,) * len(attributes), **kwargs)
    return mask_regions(request, EditConfig().resolve(attributes))


def rows_of(mask):
    return mask[0, 0].mean(dim=1).tolist()      # coverage of each image row


def test_local_masks_follow_the_regions():
    m = initial_masks(FACE, [regions(("smiling",))], S)
    assert rows_of(m.recon) == [0, 0, 1, 1, 1, 0, 0, 0]                # skin
    assert rows_of(m.blend) == [0, 0, 1, 1, 1, 1, 0, 0]                # skin + mouth
    assert rows_of(m.dynamic) == rows_of(m.shape) == [0, 0, 0, 0, 0, 1, 0, 0]
    no_skin = initial_masks(FACE, [regions(("smiling",), blend="no_skin")], S)
    assert rows_of(no_skin.blend) == [0, 0, 0, 0, 0, 1, 0, 0]


def test_hair_shape_adds_the_ears_and_global_takes_every_class_but_the_background():
    m = initial_masks(FACE, [regions(("wavy_hair",))], S)
    assert rows_of(m.recon) == [0, 0, 1, 1, 1, 0, 1, 0]
    assert rows_of(m.shape) == [1, 1, 0, 0, 0, 0, 1, 0]
    g = initial_masks(FACE, [regions(("male",))], S)
    assert rows_of(g.recon) == rows_of(g.blend) == [1, 1, 1, 1, 1, 1, 1, 0]


def test_masks_upsample_to_the_generator_but_shape_stays_at_the_parsers_size():
    m = initial_masks(FACE, [regions(("smiling",))], 2 * S)
    assert m.recon.shape[-1] == 2 * S and m.shape.shape[-1] == S


def test_dynamic_growth_moves_the_grown_region_from_recon_to_dynamic():
    r = [regions(("smiling",)), regions(("wavy_hair",))]
    start = initial_masks(FACE.repeat(2, 1, 1, 1), r, S)
    # the generated image's mouth has grown into the skin's last row, its hair into row 2
    now = probs_with({"hair": slice(0, 3), "skin": slice(3, 4), "mouth": slice(4, 6),
                      "ears": slice(6, 7)}).repeat(2, 1, 1, 1)
    grown = grow_masks(start, start, now, r, update_shape=torch.tensor([False, True]))
    assert rows_of(grown.recon[:1]) == [0, 0, 1, 1, 0, 0, 0, 0]     # mouth left the recon mask
    assert rows_of(grown.dynamic[:1]) == [0, 0, 0, 0, 1, 1, 0, 0]
    assert torch.equal(grown.shape[0], start.shape[0])              # no update_shape: kept
    assert rows_of(grown.shape[1:]) == [1, 1, 1, 0, 0, 0, 1, 0]     # hair shape grew
    assert float(grown.recon.min()) >= 0 and float(grown.dynamic.max()) <= 1


def test_the_blend_takes_generated_where_1_and_the_input_bit_for_bit_where_0():
    x, g = torch.rand(1, 3, S, S), torch.rand(1, 3, S, S)
    mask = torch.zeros(1, 1, S, S)
    mask[..., :4, :] = 1.0
    out = blend(x, g, mask)
    assert torch.equal(out[..., 4:, :], x[..., 4:, :])
    torch.testing.assert_close(out[..., :4, :], g[..., :4, :])
    half = blend(x, g, torch.full_like(mask, 0.25))
    torch.testing.assert_close(half, 0.25 * g + 0.75 * x)
