"""Adapter: a Hugging Face image-to-text model behind the worker's model seam (optional extra).

``load_hf("path/or/hub-id")`` returns an object with the same surface as the shipped model::

    model.info                          # name "hf:<id>", version, weights_sha256, tasks, ...
    model.caption(images) -> list[str]
    model.answer(images, questions) -> list[str]      # VQA-capable models only
    model.generate(prompts, seeds)                    # always UnsupportedTaskError

Supported: captioning models (BLIP, GIT, VisionEncoderDecoder, BLIP-2, ... anything in
``AutoModelForImageTextToText`` / ``AutoModelForVision2Seq``) and BLIP-style VQA models
(``BlipForQuestionAnswering``). ``tasks`` says what the architecture can really do:
captioners ("caption",), BLIP VQA checkpoints ("vqa",) (they cannot caption without a question),
BLIP-2 ("caption", "vqa").

``transformers`` (and ``huggingface_hub``) are imported lazily, inside functions, so that
``pipeline`` works without the ``loom[hf]`` extra. ``trust_remote_code`` is never enabled: only
architectures that ship with transformers are loaded.

weights_sha256: sha256 of the weight file when the model has one (so it equals ``sha256sum
model.safetensors`` and the Hub's LFS object id); for sharded weights, sha256 of the manifest
``"<sha256>  <relative path>\\n"`` lines sorted by path (the ``sha256sum`` format). Only the files
transformers loads are hashed: ``*.safetensors`` when present, else ``*.bin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.errors import PipelineError, UnknownModelError, UnsupportedTaskError

__all__ = ["HFImageToText", "HFModelError", "HFModelInfo", "load_hf", "weights_sha256"]


class HFModelError(UnknownModelError):
    """A ``hf:`` model that cannot be found or loaded, with the reason.

    A subclass of UnknownModelError (callers that handle unknown models handle this too), with a
    free-form message instead of the registry's "known models" one.
    """

    def __init__(self, name: str, message: str) -> None:
        self.name, self.known = name, []
        PipelineError.__init__(self, message)

# Architectures (config.architectures[0]) that answer questions instead of captioning.
_VQA_ONLY = {"BlipForQuestionAnswering"}
# Architectures that caption and also answer questions through a text prompt.
_CAPTION_AND_VQA = {"Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration"}
# Files fetched from the Hub (everything needed to load, no duplicate weight formats).
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "*.safetensors"]


@dataclass(frozen=True)
class HFModelInfo:
    name: str
    version: str
    weights_sha256: str
    tasks: tuple[str, ...]
    parameters: int
    device: str
    architecture: str
    source: str  # the local directory the weights were loaded from
    # Decoding is configured when the model is loaded; no task takes per-job parameters.
    params: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(directory: str | os.PathLike[str]) -> str:
    """sha256 over the weight files in ``directory`` (see the module docstring)."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*.safetensors") if p.is_file())
    if not files:
        files = sorted(p for p in root.rglob("*.bin") if p.is_file() and "training_args" not in p.name)
    if not files:
        raise HFModelError(str(root), f"no weight files (*.safetensors or *.bin) in {root}")
    if len(files) == 1:
        return _sha256_file(files[0])
    manifest = "".join(f"{_sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _local_dir(path_or_id: str, revision: str | None) -> Path:
    """A local directory holding the model: the path itself, or a Hub snapshot."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    # Hub ids are "name" or "org/name"; anything else that is not a directory is a bad path.
    if path_or_id.startswith(("/", ".", "~")) or path_or_id.count("/") > 1 or "\\" in path_or_id:
        raise HFModelError(path_or_id, f"no such model directory: {path_or_id}")
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(path_or_id, revision=revision, allow_patterns=_HUB_PATTERNS))
        if not any(snap.rglob("*.safetensors")):  # older repos: PyTorch pickles only
            snap = Path(
                snapshot_download(
                    path_or_id, revision=revision, allow_patterns=[*_HUB_PATTERNS, "*.bin"]
                )
            )
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth, network
        raise HFModelError(
            path_or_id,
            f"could not get Hugging Face model {path_or_id!r}"
            f"{f' at revision {revision!r}' if revision else ''}: {type(exc).__name__}: {exc}"
        ) from exc
    return snap


def load_hf(
    path_or_id: str,
    device: str = "auto",
    *,
    revision: str | None = None,
    max_new_tokens: int = 32,
    num_beams: int = 1,
) -> HFImageToText:
    """Load a Hugging Face image-to-text model from a local directory or a Hub id."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise HFModelError(
            path_or_id,
            "hf: models need the optional extra: pip install 'loom[hf]' (transformers)"
        ) from exc

    name = path_or_id[3:] if path_or_id.startswith("hf:") else path_or_id
    src = _local_dir(name, revision)
    try:
        config = transformers.AutoConfig.from_pretrained(src, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise HFModelError(name, f"{name}: not a Hugging Face model directory: {exc}") from exc
    arch = (config.architectures or [type(config).__name__])[0]
    if arch in _VQA_ONLY:
        tasks: tuple[str, ...] = ("vqa",)
        auto = transformers.AutoModelForVisualQuestionAnswering
    else:
        tasks = ("caption", "vqa") if arch in _CAPTION_AND_VQA else ("caption",)
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or getattr(
            transformers, "AutoModelForVision2Seq"
        )
    dev = _resolve_device(device)
    try:
        model = auto.from_pretrained(src, trust_remote_code=False)
    except ValueError as exc:
        raise HFModelError(name, f"{name}: {arch} is not an image-to-text model: {exc}") from exc
    model = model.to(dev).eval()

    processor = None
    with contextlib.suppress(Exception):
        processor = transformers.AutoProcessor.from_pretrained(src, trust_remote_code=False)
    if not isinstance(processor, transformers.ProcessorMixin):
        processor = None
    tokenizer = getattr(processor, "tokenizer", None) or transformers.AutoTokenizer.from_pretrained(src)
    image_processor = getattr(processor, "image_processor", None) or (
        transformers.AutoImageProcessor.from_pretrained(src)
    )

    info = HFModelInfo(
        name=f"hf:{name}",
        version=getattr(config, "_commit_hash", None) or "local",
        weights_sha256=weights_sha256(src),
        tasks=tasks,
        parameters=sum(p.numel() for p in model.parameters()),
        device=str(dev),
        architecture=arch,
        source=str(src),
    )
    return HFImageToText(
        model,
        info,
        processor=processor,
        tokenizer=tokenizer,
        image_processor=image_processor,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )


class HFImageToText:
    """Serving wrapper: batched, in memory, no I/O. cuda -> bf16 autocast, cpu -> fp32."""

    def __init__(
        self,
        model: Any,
        info: HFModelInfo,
        *,
        processor: Any,
        tokenizer: Any,
        image_processor: Any,
        max_new_tokens: int = 32,
        num_beams: int = 1,
    ) -> None:
        self.model = model
        self.info = info
        self.processor = processor
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(info.device)
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    def _ctx(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _gen_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.num_beams == 1:
            kw["do_sample"] = False
        return kw

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, dtype=self.model.dtype)

    def _decode(self, ids: torch.Tensor, prompts: list[str] | None = None) -> list[str]:
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        out = []
        for i, t in enumerate(texts):
            t = t.strip()
            if prompts is not None and t.startswith(prompts[i]):  # decoder-only LMs echo the prompt
                t = t[len(prompts[i]) :].strip()
            out.append(t)
        return out

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        if "caption" not in self.info.tasks:
            raise UnsupportedTaskError(f"{self.info.name} ({self.info.architecture}) cannot caption")
        if not images:
            return []
        with self._ctx():
            ids = self.model.generate(pixel_values=self._pixels(images), **self._gen_kwargs())
        return self._decode(ids)

    @torch.inference_mode()
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        if "vqa" not in self.info.tasks:
            raise UnsupportedTaskError(
                f"{self.info.name} ({self.info.architecture}) does not answer questions"
            )
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        prompts = (
            list(questions)
            if self.info.architecture in _VQA_ONLY
            else [f"Question: {q} Answer:" for q in questions]
        )
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        if self.processor is not None:
            inputs = self.processor(images=rgb, text=prompts, return_tensors="pt", padding=True)
        else:
            inputs = dict(self.tokenizer(prompts, return_tensors="pt", padding=True))
            inputs["pixel_values"] = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        inputs = {
            k: (v.to(self.device, dtype=self.model.dtype) if k == "pixel_values" else v.to(self.device))
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        with self._ctx():
            ids = self.model.generate(**inputs, **self._gen_kwargs())
        return self._decode(ids, None if self.info.architecture in _VQA_ONLY else prompts)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        raise UnsupportedTaskError(f"{self.info.name} is an image-to-text model; it cannot generate images")
