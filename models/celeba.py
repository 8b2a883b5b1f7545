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

# The order of CelebA's own attribute file (list_attr_celeba.txt), lower-cased: the
# order in which public classifiers trained on it (a ResNet-50 judge) give their outputs.
CELEBA_FILE_ORDER: tuple[str, ...] = (
    "5_o_clock_shadow", "arched_eyebrows", "attractive", "bags_under_eyes", "bald", "bangs",
    "big_lips", "big_nose", "black_hair", "blond_hair", "blurry", "brown_hair",
    "bushy_eyebrows", "chubby", "double_chin", "eyeglasses", "goatee", "gray_hair",
    "heavy_makeup", "high_cheekbones", "male", "mouth_slightly_open", "mustache",
    "narrow_eyes", "no_beard", "oval_face", "pale_skin", "pointy_nose", "receding_hairline",
    "rosy_cheeks", "sideburns", "smiling", "straight_hair", "wavy_hair", "wearing_earrings",
    "wearing_hat", "wearing_lipstick", "wearing_necklace", "wearing_necktie", "young",
)
