"""The attribute table: regions and modes."""
from models.celeba import ATTRIBUTES
from pipeline.engine.attributes import (DEFAULT_REGIONS, LOCAL_ATTRIBUTES, has_hair,
                                        has_hair_shape, is_local, regions)


def test_every_local_attribute_has_its_own_regions_and_the_rest_are_global():
    assert LOCAL_ATTRIBUTES <= set(ATTRIBUTES)
    assert not is_local(["male"]) and not is_local(["young"]) and not is_local(["pale_skin"])
    for a in LOCAL_ATTRIBUTES:
        assert is_local([a]) and regions([a]) != DEFAULT_REGIONS, a
    for a in set(ATTRIBUTES) - LOCAL_ATTRIBUTES:
        assert not is_local([a]), a
    assert len(LOCAL_ATTRIBUTES) == 14


def test_regions_are_a_union_in_a_fixed_order():
    assert regions(["smiling"]) == ("mouth",)
    assert regions(["big_nose", "smiling", "bushy_eyebrows"]) == ("mouth", "eyebrows", "nose")
    assert regions(["black_hair", "wavy_hair"]) == ("hair",)
    assert regions(["male"]) == DEFAULT_REGIONS


def test_a_global_attribute_makes_a_row_global_and_hair_flags():
    assert not is_local(["smiling", "young"])
    assert has_hair(["gray_hair"]) and not has_hair_shape(["gray_hair"])
    assert has_hair(["straight_hair"]) and has_hair_shape(["smiling", "straight_hair"])
    assert not has_hair(["bald"])
