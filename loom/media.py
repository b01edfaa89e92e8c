"""Safe input decoding: whitelisted formats, a per-call pixel limit, EXIF orientation.

Torch-free (``loom/`` never imports torch, pipeline, worker or api). Everything raises
``loom.errors`` classes; no Pillow or httpx exception escapes unwrapped.

Decoding (``decode_image``)
    * the format is decided by magic bytes against a whitelist (PNG, JPEG, WEBP, GIF, BMP, TIFF);
      anything else is refused naming what the bytes look like (text, HTML, PDF, HEIC, ...);
    * the pixel limit is per call: the format's Pillow plugin is constructed directly (only the
      header is parsed), ``width * height`` is compared with ``max_pixels`` BEFORE any pixel data is
      decoded. Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is never mutated; its own
      ``DecompressionBombWarning`` (still emitted by some plugins, e.g. GIF frame growth) is turned
      into an error for the duration of the call and reported as ``InputTooLarge``;
    * ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched (it must stay False: truncated files fail);
    * EXIF orientation is applied, the result is RGB (alpha composited over white), fully loaded
      and detached from the input buffer.

URL fetching behind the SSRF guard lives in ``loom.fetch`` (re-exported here as
``fetch_url`` for the worker).
"""
from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, ImageOps

from loom.errors import InputTooLarge, InvalidInput
from loom.fetch import fetch_url as fetch_url  # re-exported: the worker fetches through media

__all__ = [
    "decode_image",
    "encode_png",
    "fetch_url",
    "image_format",
    "sha256_hex",
]

# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

# extension -> Pillow format name
_PIL_FORMAT = {
    "png": "PNG",
    "jpg": "JPEG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
}


def _sniff(data: bytes) -> str | None:
    """The whitelisted format (extension) that the magic bytes announce, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM" and len(data) >= 26:
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


# Known non-image (or non-whitelisted image) signatures, for a useful error message.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or docx/xlsx/jar)"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"BZh", "bzip2-compressed data"),
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
    (b"8BPS", "a Photoshop (PSD) image, which is not supported"),
    (b"\x00\x00\x01\x00", "an ICO icon, which is not supported"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image, which is not supported"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream, which is not supported"),
    (b"\xff\x0a", "a JPEG XL image, which is not supported"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image, which is not supported"),
    (b"ID3", "an MP3 audio file"),
    (b"OggS", "an Ogg media file"),
    (b"fLaC", "a FLAC audio file"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
    (b"SQLite format 3", "an SQLite database"),
)


def _describe(data: bytes) -> str:
    """What the bytes look like, for an error message."""
    if data[:4] == b"RIFF" and len(data) >= 12:
        return f"a RIFF container of type {data[8:12]!r} (not WEBP)"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace").strip()
        if brand in {"heic", "heix", "hevc", "heim", "heis", "mif1", "msf1"}:
            return f"a HEIF/HEIC image (brand {brand!r}), which is not supported"
        if brand in {"avif", "avis"}:
            return "an AVIF image, which is not supported"
        return f"an ISO media file (brand {brand!r}), e.g. MP4/MOV video"
    for magic, name in _OTHER_SIGNATURES:
        if data.startswith(magic):
            return name
    # Text? (A multi-byte character cut at 512 bytes may leave a replacement char or two.)
    text = data[:512].decode("utf-8", "replace")
    printable = sum(c.isprintable() or c in "\r\n\t" for c in text)
    if text and text.count("\ufffd") <= 2 and printable >= 0.95 * len(text):
        stripped = text.lstrip("\ufeff \r\n\t").lower()
        if stripped.startswith(("<!doctype html", "<html")):
            kind = "an HTML document"
        elif stripped.startswith("<svg") or (stripped.startswith("<?xml") and "<svg" in stripped):
            kind = "an SVG image, which is not supported"
        elif stripped.startswith("<?xml"):
            kind = "an XML document"
        elif stripped.startswith(("{", "[")):
            kind = "JSON or other text"
        else:
            kind = "text"
        preview = " ".join(text.split())[:40]
        return f"{kind} (starts {preview!r})"
    return "unrecognised binary data (first bytes: " + data[:8].hex(" ") + ")"


def image_format(data: bytes) -> str:
    """The file extension ("png", "jpg", "webp", "gif", "bmp", "tiff") announced by the magic bytes.

    Raises InvalidInput for empty input or anything outside the whitelist.
    """
    if not data:
        raise InvalidInput("empty input: 0 bytes")
    fmt = _sniff(data)
    if fmt is None:
        raise InvalidInput(
            "unsupported input: not a PNG, JPEG, WEBP, GIF, BMP or TIFF image; "
            f"the {len(data):,} bytes look like {_describe(data)}"
        )
    return fmt


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _too_large(size: tuple[int, int], max_pixels: int) -> InputTooLarge:
    w, h = size
    return InputTooLarge(
        f"image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} pixels"
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16/32-bit greyscale: scale into 8 bits instead of clipping everything above 255.
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif im.mode == "F":
        im = im.convert("L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB", "1") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode untrusted image bytes into a loaded RGB ``PIL.Image.Image``.

    Raises InvalidInput (empty, not a whitelisted format, truncated or corrupt) or InputTooLarge
    (more than ``max_pixels`` pixels, judged from the header before decoding).
    """
    if max_pixels <= 0:
        raise ValueError("max_pixels must be positive")
    fmt = image_format(data)  # empty / unknown -> InvalidInput
    pil_format = _PIL_FORMAT[fmt]
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns (and errors at 2x) against the process-wide
            # MAX_IMAGE_PIXELS; any such warning inside this call is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if pil_format not in Image.OPEN:
                Image.init()
            if pil_format not in Image.OPEN:
                raise InvalidInput(f"{fmt.upper()} decoding is not available in this Pillow build")
            factory, accept = Image.OPEN[pil_format]
            if accept is not None and not accept(data[:16]):
                raise InvalidInput(f"corrupt image: the {fmt.upper()} header is not valid")
            # Constructing the plugin parses the header only (Image.open would additionally run
            # the global bomb check, whose limit is process-wide; ours is per call).
            im = factory(io.BytesIO(data), "")
            width, height = im.size
            if width <= 0 or height <= 0:
                raise InvalidInput(f"corrupt image: {fmt.upper()} header gives size {width}x{height}")
            if width * height > max_pixels:
                raise _too_large(im.size, max_pixels)
            im.load()  # decodes frame 0 only (GIF/WEBP/TIFF: the first frame / page)
            if im.size[0] * im.size[1] > max_pixels:  # e.g. a GIF frame larger than its screen
                raise _too_large(im.size, max_pixels)
            im = ImageOps.exif_transpose(im) or im
            out = _to_rgb(im)
            out.load()
            return out
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputTooLarge(
            f"image exceeds the pixel limit ({max_pixels:,} pixels): {exc}"
        ) from exc
    except MemoryError as exc:
        raise InputTooLarge(f"image needs more memory than is available to decode: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, struct.error, zlib.error, ...
        detail = str(exc) or type(exc).__name__
        raise InvalidInput(f"truncated or corrupt image: {detail}") from exc


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (deterministic for the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
