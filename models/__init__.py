"""Networks of MaskFaceGAN and their checkpoint loading. Nothing is loaded at import."""
