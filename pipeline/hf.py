"""Adapters: Hugging Face models behind the worker's model seam (optional extra).

``load_hf("path/or/hub-id")`` returns an object with the same surface as the shipped model,
chosen by what the folder holds (``pipeline.hf_caps.describe``, which also gives the tasks and
params it declares)::

    model.info          # name "hf:<id>", version, weights_sha256, tasks, params, ...

- chat VLMs (an ``AutoModelForImageTextToText`` whose processor has a chat template: LLaVA,
  Idefics3/SmolVLM, Qwen2-VL, Gemma 3 ...): ``pipeline.hf_chat.HFChatVLM``, caption with an
  instruction and vqa, with sampling params.
- CLIP / SigLIP: ``pipeline.hf_embed.HFEmbedder``, embed and embed_text.
- captioners (BLIP, GIT, VisionEncoderDecoder, BLIP-2, ... anything in
  ``AutoModelForImageTextToText`` / ``AutoModelForVision2Seq`` without a chat template) and
  BLIP-style VQA models (``BlipForQuestionAnswering``): ``HFImageToText`` below, no params.
  ``tasks`` says what the architecture can really do: captioners ("caption",), BLIP VQA
  checkpoints ("vqa",) (they cannot caption without a question), BLIP-2 ("caption", "vqa").

``transformers`` (and ``huggingface_hub``) are imported lazily, inside functions, so that
``pipeline`` works without the ``loom[hf]`` extra. ``trust_remote_code`` is never enabled: only
architectures that ship with transformers are loaded. On cuda, chat VLMs and embedders are
loaded in bf16 (fp16 where bf16 is missing); captioners keep fp32 weights under bf16 autocast.

weights_sha256: sha256 of the weight file when the model has one (so it equals ``sha256sum
model.safetensors`` and the Hub's LFS object id); for sharded weights, sha256 of the manifest
``"<sha256>  <relative path>\\n"`` lines sorted by path (the ``sha256sum`` format). Only the files
transformers loads are hashed: ``*.safetensors`` when present, else ``*.bin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline import hf_caps
from pipeline.errors import PipelineError, UnknownModelError, UnsupportedTaskError
from pipeline.hf_caps import VQA_ONLY

__all__ = ["HFImageToText", "HFModelError", "HFModelInfo", "load_hf", "serving_dtype", "torch_device",
           "weights_sha256"]


class HFModelError(UnknownModelError):
    """A ``hf:`` model that cannot be found or loaded, with the reason.

    A subclass of UnknownModelError (callers that handle unknown models handle this too), with a
    free-form message instead of the registry's "known models" one.
    """

    def __init__(self, name: str, message: str) -> None:
        self.name, self.known = name, []
        PipelineError.__init__(self, message)

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
    # task -> keyword params its method takes (pipeline.hf_caps.describe); captioners take none:
    # their decoding is configured when the model is loaded.
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


def torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def local_dir(ref: str, revision: str | None, *, what: str, fetch: Callable[[], Path]) -> Path:
    """A local directory holding the model: the path itself, or what ``fetch`` brings from the
    Hub. ``what`` names it in errors ("Hugging Face model", "diffusers pipeline")."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    # Hub ids are "name" or "org/name"; anything else that is not a directory is a bad path.
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref:
        raise HFModelError(ref, f"no such {what.split()[-1]} directory: {ref}")
    try:
        return fetch()
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth, network
        raise HFModelError(
            ref,
            f"could not get {what} {ref!r}"
            f"{f' at revision {revision!r}' if revision else ''}: {type(exc).__name__}: {exc}"
        ) from exc


def _snapshot(path_or_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(path_or_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    if not any(snap.rglob("*.safetensors")):  # older repos: PyTorch pickles only
        snap = Path(snapshot_download(path_or_id, revision=revision,
                                      allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
    return snap


def serving_dtype(device: torch.device) -> torch.dtype:
    """Weights' dtype for a model served on ``device``: half precision on cuda, fp32 on cpu."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _pretrained(auto: Any, src: Path, name: str, what: str, **kwargs: Any) -> Any:
    try:
        return auto.from_pretrained(src, trust_remote_code=False, **kwargs)
    except (ValueError, OSError, KeyError) as exc:  # wrong architecture for the auto class, bad files
        raise HFModelError(name, f"{name}: not {what}: {exc}") from exc
    except ImportError as exc:
        # A processor part needs a package this environment lacks (Qwen2-VL's and SmolVLM's
        # video processors need torchvision, SmolVLM's num2words): no retry here will add it.
        raise HFModelError(name, f"{name}: a package is missing: {' '.join(str(exc).split())}"
                           ) from exc


def load_hf(
    path_or_id: str,
    device: str = "auto",
    *,
    revision: str | None = None,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
) -> Any:
    """Load a Hugging Face model from a local directory or a Hub id: a captioner
    (``HFImageToText``), a chat VLM (``HFChatVLM``) or an embedder (``HFEmbedder``).
    ``max_new_tokens`` is the default length (32 for captioners, 128 for chat VLMs)."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise HFModelError(
            path_or_id,
            "hf: models need the optional extra: pip install 'loom[hf]' (transformers)"
        ) from exc

    name = path_or_id[3:] if path_or_id.startswith("hf:") else path_or_id
    src = local_dir(name, revision, what="Hugging Face model",
                    fetch=lambda: _snapshot(name, revision))
    if (src / "model_index.json").is_file():
        raise HFModelError(name, f"{name}: a diffusers pipeline; load it as diffusers:{name}")
    try:
        config = transformers.AutoConfig.from_pretrained(src, trust_remote_code=False)
        kind = hf_caps.kind(src)
    except Exception as exc:  # noqa: BLE001
        raise HFModelError(name, f"{name}: not a Hugging Face model directory: {exc}") from exc
    tasks, params = hf_caps.describe(src)
    arch = (config.architectures or [type(config).__name__])[0]
    dev = torch_device(device)

    def info(model: Any) -> HFModelInfo:
        return HFModelInfo(
            name=f"hf:{name}",
            version=getattr(config, "_commit_hash", None) or "local",
            weights_sha256=weights_sha256(src),
            tasks=tasks,
            parameters=sum(p.numel() for p in model.parameters()),
            device=str(dev),
            architecture=arch,
            source=str(src),
            params=params,
        )

    if kind in ("chat", "embedder"):
        auto, what = ((transformers.AutoModelForImageTextToText, "an image-text-to-text model")
                      if kind == "chat" else (transformers.AutoModel, "a CLIP/SigLIP model"))
        model = _pretrained(auto, src, name, what, dtype=serving_dtype(dev)).to(dev)
        processor = _pretrained(transformers.AutoProcessor, src, name, "a model with a processor")
        if not isinstance(processor, transformers.ProcessorMixin):
            raise HFModelError(name, f"{name}: {arch} has no multimodal processor "
                                     "(processor_config.json or preprocessor_config.json)")
        if kind == "chat" and not getattr(processor, "chat_template", None):
            processor.chat_template = hf_caps.BUILTIN_CHAT_TEMPLATES.get(arch)
        if kind == "embedder":
            from pipeline.hf_embed import HFEmbedder

            return HFEmbedder(model, processor, info(model))
        from pipeline.hf_chat import HFChatVLM

        return HFChatVLM(model, processor, info(model), max_new_tokens=max_new_tokens)

    if arch in VQA_ONLY:
        auto = transformers.AutoModelForVisualQuestionAnswering
    else:
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or getattr(
            transformers, "AutoModelForVision2Seq"
        )
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
    return HFImageToText(
        model,
        info(model),
        processor=processor,
        tokenizer=tokenizer,
        image_processor=image_processor,
        max_new_tokens=max_new_tokens or 32,
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
            if self.info.architecture in VQA_ONLY
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
        return self._decode(ids, None if self.info.architecture in VQA_ONLY else prompts)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        raise UnsupportedTaskError(f"{self.info.name} is an image-to-text model; it cannot generate images")
