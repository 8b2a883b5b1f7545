"""The editing engine: MaskFaceGAN's batched masked latent optimisation.

    editor.py       Editor: one group's edit as six calls in the paper's order
    settings.py     edit settings: dotted keys in, a frozen typed EditSettings out
    schedule.py     which loss terms and events each step runs
    rows.py         what one edit row may ask (EditRequest), and the on-target rule
    attributes.py   regions and modes per attribute
    masks.py        the four masks, their growth and the blend
    losses.py       each loss term, per image
    health.py       which images are still finite, tracked on the device
    early_stop.py   an image leaving the latent phase once done (opt-in)
    entanglement.py what an edit did to the attributes it did not target
    resize.py       the original's image resize rule
    runtime.py      how the engine runs (compile, precision, memory), applied per process
    batch_size.py   the largest batch that fits a GPU, probed

May import (an allow-list, held by `lint-imports`): the standard library, torch, numpy,
`models`, `pipeline.errors` and `pipeline.store.uris` (dotted keys). Nothing else: no
storage, PIL, pandas, pyarrow, YAML or Ray; an edit is tensors in, tensors out, and its
files are read only by `models`' loaders.
"""
