"""CelebA's 40 attributes, in the order of the attribute classifier's logits. Plain data:
importing it loads no framework."""

ATTRIBUTES: tuple[str, ...] = (
    "blurry", "sideburns", "wearing_earrings", "bald", "goatee", "mustache",
    "5_o_clock_shadow", "arched_eyebrows", "no_beard", "heavy_makeup", "male",
    "wearing_lipstick", "black_hair", "high_cheekbones", "smiling", "mouth_slightly_open",
    "oval_face", "bushy_eyebrows", "attractive", "young", "gray_hair", "brown_hair",
    "blond_hair", "pale_skin", "chubby", "double_chin", "big_nose", "bags_under_eyes",
    "wearing_necklace", "wearing_necktie", "rosy_cheeks", "bangs", "wavy_hair",
    "straight_hair", "wearing_hat", "big_lips", "narrow_eyes", "pointy_nose",
    "receding_hairline", "eyeglasses",
)
ATTRIBUTE_INDEX: dict[str, int] = {name: i for i, name in enumerate(ATTRIBUTES)}
