"""Adapter: a diffusers text-to-image pipeline behind the worker's model seam (optional extra).

``load_diffusers("path/or/hub-id")`` loads any folder that ``AutoPipelineForText2Image`` loads
(Stable Diffusion 1.x/2.x, SDXL, PixArt, Flux, ...; an img2img folder is served by its
text-to-image pipeline) and returns::

    model.info      # name "diffusers:<id>", version, weights_sha256, tasks ("generate",), params
    model.generate(prompts, seeds, *, num_inference_steps=None, guidance_scale=None,
                   width=None, height=None) -> list[PIL.Image.Image]      # RGB

Unset params keep the pipeline's own defaults. Each item is denoised alone, from noise drawn
by a CPU ``torch.Generator`` seeded with its seed: the same seed gives the same bytes on the same
device whatever else shares the batch, and the same starting noise on every device. (One batched
call with a list of generators gives each item the same noise, but not the same bytes: the
kernels' float sums differ with the batch size, by ~1e-7 on cpu and more in bf16 on cuda, and
that flips a pixel's rounding now and then.) The safety checker is not loaded.

``diffusers`` is imported lazily; no custom pipeline code is ever run (no ``custom_pipeline``,
no ``trust_remote_code``). weights_sha256: ``pipeline.hf.weights_sha256`` over the folder, i.e.
the sorted ``sha256sum`` manifest of every ``*.safetensors`` under it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline import hf_caps
from pipeline.errors import UnsupportedTaskError
from pipeline.hf import HFModelError, HFModelInfo, local_dir, serving_dtype, torch_device, weights_sha256

__all__ = ["DiffusersTextToImage", "load_diffusers"]


def load_diffusers(ref: str, device: str = "auto", *, revision: str | None = None) -> DiffusersTextToImage:
    """Load a diffusers text-to-image pipeline from a local directory or a Hub id."""
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise HFModelError(
            ref, "diffusers: models need the optional extra: pip install 'loom[diffusers]'"
        ) from exc

    name = ref.removeprefix("diffusers:")
    # download() picks the files the pipeline loads (one weight format and variant)
    src = local_dir(name, revision, what="diffusers pipeline",
                    fetch=lambda: Path(diffusers.DiffusionPipeline.download(name, revision=revision)))
    index_file = src / "model_index.json"
    if not index_file.is_file():
        raise HFModelError(name, f"{name}: not a diffusers pipeline directory (no model_index.json)")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    kwargs: dict[str, Any] = {}
    if "safety_checker" in index:
        # Only pipelines that have the component may be given it (others log that it is ignored).
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    dev = torch_device(device)
    try:
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
            src, dtype=serving_dtype(dev), **kwargs)
    except (ValueError, OSError, KeyError) as exc:  # not a text-to-image pipeline, bad files
        raise HFModelError(name, f"{name}: not a diffusers text-to-image pipeline: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev)
    tasks, params = hf_caps.describe(src)
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    # a Hub snapshot's folder is named by its commit
    version = src.name if src.parent.name == "snapshots" else "local"
    info = HFModelInfo(
        name=f"diffusers:{name}",
        version=version,
        weights_sha256=weights_sha256(src),
        tasks=tasks,
        parameters=sum(p.numel() for m in modules for p in m.parameters()),
        device=str(dev),
        architecture=type(pipe).__name__,
        source=str(src),
        params=params,
    )
    return DiffusersTextToImage(pipe, info)


class DiffusersTextToImage:
    """Serving wrapper: in memory, no I/O; a batch's items run one after another."""

    def __init__(self, pipe: Any, info: HFModelInfo) -> None:
        self.pipe = pipe
        self.info = info
        self.device = torch.device(info.device)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 width: int | None = None, height: int | None = None) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        options = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                   "width": width, "height": height}
        kwargs = {k: v for k, v in options.items() if v is not None}
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):  # one at a time: see the module doc
            out = self.pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(int(seed)),
                            num_images_per_prompt=1, output_type="pil", **kwargs)
            image = out.images[0]
            images.append(image if image.mode == "RGB" else image.convert("RGB"))
        return images

    def caption(self, images: Sequence[Image.Image], **params: Any) -> list[str]:
        raise UnsupportedTaskError(f"{self.info.name} is a text-to-image model; it cannot caption")

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], **params: Any) -> list[str]:
        raise UnsupportedTaskError(f"{self.info.name} is a text-to-image model; it does not answer questions")
