"""The Ray Data stage: a model-holding callable class, one instance per GPU.

Ray Data creates an actor pool of `EditStage`; each actor loads the networks the job
needs once, in `__init__`, and edits batches of manifest rows in `__call__`. Rows carry
URIs, not pixels: the actor reads each image itself, writes the image, latent, mask
(and noise) files, then the batch's metrics file, and returns the metrics rows. A row
that fails (unreadable image, numeric blow-up) becomes a `status=error` row; it never
fails the batch.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from PIL import Image

from models.loaders import load_models
from models.spec import ModelsSpec

from .config import Settings, settings_key
from .engine import Editor, EditResult
from .errors import SetupError
from .identity import load_identity
from .images import ImageError, encode_png, paste, png_bytes, read_image, read_pil, to_uint8
from .outputs import Output
from .rows import EditRequest, is_null

log = logging.getLogger(__name__)

NETWORK_HASH_COLUMNS = ("generator", "face_parser", "classifier", "e4e", "lpips_trunk")
METRIC_COLUMNS = ("preservation_l1", "outside_pixels", "outside_mse", "outside_psnr",
                  "recon_mse", "region_portion_before", "region_portion_after", "steps",
                  "seconds", "mode")


class EditStage:
    """Args:
        spec: the models spec, mean-latent overrides applied (the driver reads it).
        networks: the networks to load (pipeline.config.required_networks).
        settings: each row's resolved settings, by `settings_key(attributes, mode)`.
        parser_size: the face parser's working size.
        output_uri, storage_options: where results go, and how to reach it.
        schema: the metrics schema, passthrough columns included.
        save_noises, paste_back: the optional outputs.
        cpu_threads: torch threads (CPU actors).
    """

    def __init__(self, spec: ModelsSpec, networks: Sequence[str],
                 settings: Mapping[tuple, Settings], parser_size: int, output_uri: str,
                 storage_options: Mapping | None, schema: pa.Schema, save_noises: bool = False,
                 paste_back: bool = False, cpu_threads: int | None = None):
        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.storage_options = dict(storage_options or {})
        self.settings = dict(settings)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models = load_models(spec, device=self.device, parser_size=parser_size,
                                  networks=networks, storage_options=self.storage_options)
        self.model_loads = 1          # reported per row: more would mean a reloading actor
        self.editor = Editor(self.models)
        self.output = Output(output_uri, self.storage_options)
        self.schema = schema
        self.save_noises = save_noises
        self.paste_back = paste_back
        self.identity = self._identity()
        self.face_identity = load_identity()      # dlib's face descriptors (the align extra)
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
        inputs = self._read_inputs(rows, records)
        if inputs:
            self._edit(rows, records, inputs)
        now = time.time()
        for r in records:
            r["written_at"] = now
        out = pd.DataFrame.from_records(records)
        for name in self.schema.names:
            if name not in out.columns:
                out[name] = None
        self.output.write_metrics(out, self.schema)    # last: the rows are now complete
        return out[self.schema.names]

    def _read_inputs(self, rows: list[dict], records: list[dict]) -> list[tuple]:
        """(position, image, request, settings) of each row whose input is usable; the
        others get their error on their record."""
        inputs = []
        for k, row in enumerate(rows):
            try:
                image = read_image(row["image_uri"], self.editor.resolution,
                                   self.storage_options)
                request = EditRequest.from_row(row)
            except (ValueError, OSError) as e:   # ImageError is a ValueError
                records[k].update(status="error", error=str(e))
                continue
            inputs.append((k, image, request,
                           self.settings[settings_key(request.attributes, row.get("mode"))]))
        return inputs

    def _edit(self, rows: list[dict], records: list[dict], inputs: list[tuple]) -> None:
        started = time.perf_counter()
        positions, images, requests, settings = zip(*inputs)
        try:
            results = self.editor.edit(torch.stack(images), list(requests),
                                       settings=list(settings))
        except SetupError:
            raise
        except Exception as e:   # a whole-batch failure (e.g. out of memory) fails its rows
            log.error("batch failed: %s", traceback.format_exc())
            for k in positions:
                records[k].update(status="error", error=f"batch failed: {type(e).__name__}: {e}")
            return
        for k, image, result in zip(positions, images, results):
            if not result.ok:
                records[k].update(status="error", error=result.error)
                continue
            try:
                records[k].update(self._write(rows[k], result, image))
            except (ImageError, OSError, ValueError) as e:
                records[k].update(status="error", error=f"writing outputs: {e}")
        log.info("edited %d rows in %.1f s", len(positions), time.perf_counter() - started)

    def _base_record(self, row: dict) -> dict[str, Any]:
        record = {k: v for k, v in row.items() if k in self.schema.names}
        hashes = self.models.hashes
        source = row.get("source_uri")
        record.update({
            "status": "ok", "error": None, "input_uri": row["image_uri"],
            "source_uri": row["image_uri"] if is_null(source) else source,
            "attributes": list(row["attributes"]), "targets": [float(t) for t in row["targets"]],
            "size": float(row["size"]), "seed": int(row["seed"]),
            "mode": None, **self.identity, "actor_model_loads": self.model_loads,
            "tiny_models": self.models.tiny,
            **{f"{name}_sha256": hashes.get(name) for name in NETWORK_HASH_COLUMNS}})
        return record

    def _write(self, row: dict, result: EditResult, image: torch.Tensor) -> dict[str, Any]:
        """The row's files, then its metric values for the record (`image`: the input)."""
        out, row_id = self.output, row["id"]
        assert result.edited is not None and result.latent is not None
        out.put(f"images/{row_id}.png", encode_png(result.edited))
        out.put_npy(f"latents/{row_id}.npy", result.latent.float().numpy())
        out.put(f"masks/{row_id}.png", encode_png(result.masks["blend"]))
        record: dict[str, Any] = {"edited_uri": out.uri_of("images", row_id),
                  "latent_uri": out.uri_of("latents", row_id),
                  "mask_uri": out.uri_of("masks", row_id)}
        if self.save_noises and result.noises is not None:
            out.put_npz(f"noises/{row_id}.npz",
                        {f"noise_{i}": n.float().numpy() for i, n in enumerate(result.noises)})
            record["noises_uri"] = out.uri_of("noises", row_id)
        quad = row.get("align_quad")
        if (self.paste_back and not is_null(row.get("source_uri")) and quad is not None
                and len(quad) == 8):
            photo = read_pil(row["source_uri"], self.storage_options)
            edited = Image.fromarray(to_uint8(result.edited))
            pasted = paste(photo, edited, np.asarray(quad, dtype=np.float64).reshape(4, 2))
            out.put(f"pasted/{row_id}.png", png_bytes(pasted))
            record["pasted_uri"] = out.uri_of("pasted", row_id)
        m = result.metrics
        attrs = list(m["prob_input"])
        record.update({k: m[k] for k in METRIC_COLUMNS})
        record["prob_input"] = [m["prob_input"][a] for a in attrs]
        record["prob_result"] = [m["prob_result"][a] for a in attrs]
        record.update(self.face_identity.compare_one(to_uint8(image), to_uint8(result.edited)))
        return record
