"""Offline builders for tiny random-weight chat VLMs whose processors use torchvision (no hub).

Each ``build_<arch>(out)`` makes a config with a few dozen hidden units and one or two layers, a
processor built locally (the architecture's torchvision-backed image processor, its video
processor where it has one, a word-level tokenizer holding the architecture's special tokens, and
a chat template in the architecture's style), and saves both with ``save_pretrained`` into
``out``, so that ``registry.load("hf:" + str(out))`` loads them through the real loading code.

The torchvision classes (``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor``,
``SmolVLMVideoProcessor`` ...) are used on purpose: they are what ``AutoProcessor`` picks for a
real checkpoint when torchvision is installed. Import this module only where torchvision is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tiny_hf import (
    IDEFICS_TEMPLATE,
    LLAVA_SPECIAL,
    LLAVA_TEMPLATE,
    WORDS,
    word_tokenizer,
)

from test_hf_chat import build_gemma3  # the same tiny Gemma 3; here with torchvision's processor

from pipeline.hf_caps import BUILTIN_CHAT_TEMPLATES

# Role words of the templates below are plain words: a random model may say them, and that
# must decode as text.
CHAT_WORDS = [*WORDS, "of", "USER", "ASSISTANT", "User", "Assistant", "user", "assistant"]

# Every tokenizer below puts its special tokens first: pad = 0, bos = 1, eos = 2.
PAD, BOS, EOS = 0, 1, 2


# Qwen2-VL / Qwen2.5-VL: ChatML turns, the image as <|vision_start|><|image_pad|><|vision_end|>;
# the processor expands <|image_pad|> to one token per merged 2x2 patch group of the image.
QWEN_SPECIAL = ["<|endoftext|>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Idefics3 / SmolVLM: the processor expands <image> into <fake_token_around_image><global-img>
# <image>*image_seq_len<fake_token_around_image>.
# With image splitting, each tile is announced by <row_R_col_C>.
IDEFICS_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>", "<global-img>",
                   "<end_of_utterance>", *(f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2))]

# PaliGemma: the processor puts image_seq_length <image> tokens first and bos after the last one.
PALIGEMMA_SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>"]
PALIGEMMA_TEMPLATE = BUILTIN_CHAT_TEMPLATES["PaliGemmaForConditionalGeneration"]


def _llama(vocab_size: int) -> Any:
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )


def _save(model: Any, processor: Any, n_special: int, out: Path) -> Path:
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD, BOS, EOS
    # A random model may stop or emit placeholders at once; keep it saying words.
    gen.suppress_tokens = list(range(n_special))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_llava(out: Path) -> Path:
    """The control: LLaVA (CLIP tower + Llama), here with the torchvision CLIPImageProcessor."""
    tok = word_tokenizer(LLAVA_SPECIAL, CHAT_WORDS, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                         unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    vision = transformers.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=_llama(len(tok)), image_token_id=4,
                                   vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg)
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(
        image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return _save(model, processor, len(LLAVA_SPECIAL), out)


def _qwen_tokenizer() -> Any:
    return word_tokenizer(
        QWEN_SPECIAL, CHAT_WORDS, pad_token="<|endoftext|>", bos_token="<s>", eos_token="<|im_end|>",
        unk_token="<unk>", additional_special_tokens=QWEN_SPECIAL[4:])


def _qwen_processor(cls: Any, tok: Any) -> Any:
    # patch 4 px, merged 2x2: one image token per 8x8 px; 256..1024 px per image, so the three
    # test images get 12, 12 and 16 tokens (their rows differ in length before padding)
    geometry = dict(patch_size=4, temporal_patch_size=2, merge_size=2,
                    size={"shortest_edge": 256, "longest_edge": 1024})
    ip = transformers.Qwen2VLImageProcessor(**geometry)
    vp = transformers.Qwen2VLVideoProcessor(**geometry)
    return cls(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)


def _qwen_text(vocab_size: int) -> dict[str, Any]:
    # head_dim 16: the multimodal rope splits its 8 frequencies over (time, height, width)
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


_QWEN_IDS = dict(vision_start_token_id=5, vision_end_token_id=6, image_token_id=7, video_token_id=8)


def build_qwen2_vl(out: Path) -> Path:
    tok = _qwen_tokenizer()
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = transformers.Qwen2VLConfig(text_config=_qwen_text(len(tok)), vision_config=vision, **_QWEN_IDS)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg)
    return _save(model, _qwen_processor(transformers.Qwen2VLProcessor, tok), len(QWEN_SPECIAL), out)


def build_qwen2_5_vl(out: Path) -> Path:
    tok = _qwen_tokenizer()
    # two blocks: one windowed (window 16 px = 2x2 merged groups), one full attention
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                  fullatt_block_indexes=[1])
    cfg = transformers.Qwen2_5_VLConfig(text_config=_qwen_text(len(tok)), vision_config=vision, **_QWEN_IDS)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    return _save(model, _qwen_processor(transformers.Qwen2_5_VLProcessor, tok), len(QWEN_SPECIAL), out)


def _idefics_tokenizer() -> Any:
    return word_tokenizer(IDEFICS_SPECIAL, CHAT_WORDS, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>", additional_special_tokens=IDEFICS_SPECIAL[4:])


_IDEFICS_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)
# Splitting on, as the real checkpoints have it: the longest edge is resized to 64 px and the image
# cut into 32x32 tiles plus a 32x32 global view, each (32 / 8)^2 patches merged 2x2 -> 4 tokens.
# The test images get 2x2, 1x2 and 2x2 tiles, so the batch pads pixel_values with empty tiles.
_IDEFICS_IMAGES = dict(do_image_splitting=True, size={"longest_edge": 64},
                       max_image_size={"longest_edge": 32})


def build_idefics3(out: Path) -> Path:
    """Idefics3 (SmolVLM v1 checkpoints such as HuggingFaceTB/SmolVLM-Instruct are this class)."""
    tok = _idefics_tokenizer()
    cfg = transformers.Idefics3Config(vision_config=transformers.Idefics3VisionConfig(**_IDEFICS_VISION),
                                      text_config=_llama(len(tok)), image_token_id=4, scale_factor=2,
                                      pad_token_id=PAD)
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(cfg)
    ip = transformers.Idefics3ImageProcessor(**_IDEFICS_IMAGES)
    processor = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                                               chat_template=IDEFICS_TEMPLATE)
    return _save(model, processor, len(IDEFICS_SPECIAL), out)


def build_smolvlm(out: Path) -> Path:
    """SmolVLM (SmolVLM2 checkpoints): Idefics3's shape plus a video processor (torchvision) and
    the num2words package."""
    tok = _idefics_tokenizer()
    cfg = transformers.SmolVLMConfig(vision_config=transformers.SmolVLMVisionConfig(**_IDEFICS_VISION),
                                     text_config=_llama(len(tok)), image_token_id=4, scale_factor=2,
                                     pad_token_id=PAD)
    torch.manual_seed(0)
    model = transformers.SmolVLMForConditionalGeneration(cfg)
    ip = transformers.SmolVLMImageProcessor(**_IDEFICS_IMAGES)
    vp = transformers.SmolVLMVideoProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = transformers.SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                              image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return _save(model, processor, len(IDEFICS_SPECIAL), out)


def build_paligemma(out: Path, *, chat_template: bool = True) -> Path:
    """PaliGemma (SigLIP tower + Gemma). ``chat_template=False`` saves it with no chat template
    (as far as we know, the Hub's pt and mix checkpoints have none)."""
    tok = word_tokenizer(PALIGEMMA_SPECIAL, CHAT_WORDS, pad_token="<pad>", bos_token="<bos>",
                         eos_token="<eos>", unk_token="<unk>",
                         extra_special_tokens={"image_token": "<image>"})
    ip = transformers.SiglipImageProcessor(size={"height": 16, "width": 16})
    ip.image_seq_length = 16  # (16 / 4)^2 patches, no merge
    # the processor adds PaliGemma's 1024 <locNNNN> and 128 <segNNN> tokens to the tokenizer
    processor = transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=tok,
                                                chat_template=PALIGEMMA_TEMPLATE if chat_template else None)
    vision = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64)
    text = dict(model_type="gemma", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=4,
                                       projection_dim=32, hidden_size=32, vocab_size=len(tok))
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(cfg)
    return _save(model, processor, len(PALIGEMMA_SPECIAL), out)


BUILDERS = {"llava": build_llava, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
            "idefics3": build_idefics3, "smolvlm": build_smolvlm, "paligemma": build_paligemma,
            "paligemma_no_template": lambda out: build_paligemma(out, chat_template=False),
            "gemma3": build_gemma3}
ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                 "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                 "idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
                 "paligemma": "PaliGemmaForConditionalGeneration",
                 "paligemma_no_template": "PaliGemmaForConditionalGeneration",
                 "gemma3": "Gemma3ForConditionalGeneration"}
# The image processor class AutoProcessor must load back (the torchvision backend, not *Pil).
IMAGE_PROCESSORS = {"llava": "CLIPImageProcessor", "qwen2_vl": "Qwen2VLImageProcessor",
                    "qwen2_5_vl": "Qwen2VLImageProcessor", "idefics3": "Idefics3ImageProcessor",
                    "smolvlm": "SmolVLMImageProcessor", "paligemma": "SiglipImageProcessor",
                    "paligemma_no_template": "SiglipImageProcessor", "gemma3": "Gemma3ImageProcessor"}
