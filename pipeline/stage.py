"""The Ray Data stage: a model-holding callable class, one instance per GPU.

Ray Data creates an actor pool of `EditStage`; each actor loads the models once in
`__init__` and edits batches of manifest rows in `__call__`. Rows carry URIs, not
pixels: the actor reads each image itself, writes the image, latent, mask (and noise)
files, then the batch's metrics file, and returns the metrics rows. A row that fails
(unreadable image, numeric blow-up) becomes a `status=error` row; it never fails the
batch.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image

from models.loaders import load_models
from models.spec import read_spec

from .config import EditConfig, apply_mean_latent
from .engine import Editor, EditRequest
from .images import (ImageError, encode_png, paste, png_bytes, read_image, read_pil,
                     to_uint8)
from .outputs import Output

log = logging.getLogger(__name__)
MODEL_LOADS = 0      # per process: how often this worker loaded the models (should be 1)


class EditStage:
    def __init__(self, models_uri: str, edit: Mapping, output_uri: str,
                 storage_options: Mapping | None, schema: pa.Schema, save_noises: bool = False,
                 paste_back: bool = False, with_global: bool = True,
                 cpu_threads: int | None = None):
        global MODEL_LOADS
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.storage_options = dict(storage_options or {})
        self.config = EditConfig.from_overrides(edit)
        spec = apply_mean_latent(read_spec(models_uri, self.storage_options), self.config)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = load_models(spec, device=self.device, parser_size=self.config["parser_size"],
                                  with_global=with_global, storage_options=self.storage_options)
        MODEL_LOADS += 1
        self.editor = Editor(self.models, self.config)
        self.output = Output(output_uri, self.storage_options)
        self.schema = schema
        self.save_noises = save_noises
        self.paste_back = paste_back
        self.identity = self._identity()
        log.info("edit actor ready on %s (%s)", self.identity["node"], self.device)

    @staticmethod
    def _identity() -> dict:
        try:
            import ray
            ctx = ray.get_runtime_context()
            actor = ctx.get_actor_id() or f"pid-{os.getpid()}"
            gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
            node = f"{socket.gethostname()}/{ctx.get_node_id()[:12]}"
        except Exception:   # outside Ray (direct use, tests)
            actor, gpu_ids, node = f"pid-{os.getpid()}", "", socket.gethostname()
        return {"node": node, "actor": actor, "gpu_ids": gpu_ids}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict("records")
        records = [self._base_record(r) for r in rows]
        images, requests, live = [], [], []
        for k, row in enumerate(rows):
            try:
                images.append(read_image(row["image_uri"], self.editor.resolution,
                                         self.storage_options))
                requests.append(self._request(row))
                live.append(k)
            except (ImageError, ValueError, OSError) as e:
                records[k].update(status="error", error=str(e))
        if live:
            started = time.perf_counter()
            try:
                results = self.editor.edit(torch.stack(images), requests)
            except Exception as e:   # a whole-batch failure (e.g. out of memory) fails its rows
                log.error("batch failed: %s", traceback.format_exc())
                results = [None] * len(live)
                for k in live:
                    records[k].update(status="error", error=f"batch failed: {type(e).__name__}: {e}")
            for k, result in zip(live, results):
                if result is None:
                    continue
                if not result.ok:
                    records[k].update(status="error", error=result.error)
                    continue
                try:
                    records[k].update(self._write(rows[k], result))
                except (ImageError, OSError, ValueError) as e:
                    records[k].update(status="error", error=f"writing outputs: {e}")
            log.info("edited %d rows in %.1f s", len(live), time.perf_counter() - started)
        now = time.time()
        for r in records:
            r["written_at"] = now
        out = pd.DataFrame.from_records(records)
        for name in self.schema.names:
            if name not in out.columns:
                out[name] = None
        self.output.write_metrics(out, self.schema)    # last: the rows are now complete
        return out[self.schema.names]

    def _request(self, row) -> EditRequest:
        return EditRequest(tuple(row["attributes"]), tuple(row["targets"]), size=float(row["size"]),
                           smoothing=_none(row.get("smoothing")), blend=_none(row.get("blend")),
                           mode=_none(row.get("mode")), seed=int(row["seed"]))

    def _base_record(self, row) -> dict:
        record = {k: v for k, v in row.items() if k in self.schema.names}
        hashes = self.models.hashes
        record.update({
            "status": "ok", "error": None, "input_uri": row["image_uri"],
            "source_uri": _none(row.get("source_uri")) or row["image_uri"],
            "attributes": list(row["attributes"]), "targets": [float(t) for t in row["targets"]],
            "size": float(row["size"]), "seed": int(row["seed"]),
            "mode": None, **self.identity, "actor_model_loads": MODEL_LOADS,
            "tiny_models": self.models.tiny,
            **{f"{name}_sha256": hashes.get(name) for name in
               ("generator", "face_parser", "classifier", "e4e", "lpips_trunk")}})
        return record

    def _write(self, row, result) -> dict:
        out, row_id = self.output, row["id"]
        out.put(f"images/{row_id}.png", encode_png(result.edited))
        out.put_npy(f"latents/{row_id}.npy", result.latent.float().numpy())
        out.put(f"masks/{row_id}.png", encode_png(result.masks["blend"]))
        record = {"image_uri": out.uri_of("images", row_id),
                  "latent_uri": out.uri_of("latents", row_id),
                  "mask_uri": out.uri_of("masks", row_id)}
        if self.save_noises:
            out.put_npz(f"noises/{row_id}.npz",
                        {f"noise_{i}": n.float().numpy() for i, n in enumerate(result.noises)})
            record["noises_uri"] = out.uri_of("noises", row_id)
        quad = row.get("align_quad")
        if self.paste_back and _none(row.get("source_uri")) and quad is not None and len(quad) == 8:
            photo = read_pil(row["source_uri"], self.storage_options)
            edited = Image.fromarray(to_uint8(result.edited))
            pasted = paste(photo, edited, np.asarray(quad, dtype=np.float64).reshape(4, 2))
            out.put(f"pasted/{row_id}.png", png_bytes(pasted))
            record["pasted_uri"] = out.uri_of("pasted", row_id)
        m = result.metrics
        attrs = list(m["prob_input"])
        record.update({k: m[k] for k in ("preservation_l1", "outside_pixels", "outside_mse",
                                         "outside_psnr", "recon_mse", "region_portion_before",
                                         "region_portion_after", "steps", "seconds", "mode")})
        record["prob_input"] = [m["prob_input"][a] for a in attrs]
        record["prob_result"] = [m["prob_result"][a] for a in attrs]
        return record


def _none(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value
