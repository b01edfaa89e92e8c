"""loom.media: decoding untrusted image bytes."""

from __future__ import annotations

import io
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from fixtures_worker import missing
from loom.errors import InputTooLarge, InvalidInput
from loom.media import decode_image, encode_png, image_format, sha256_hex

LIMIT = 40_000_000


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit greyscale PNG of one colour, built row-block by row-block (never 900 MP)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte + packed bits
    block_rows = 1000
    block = row * block_rows
    comp = zlib.compressobj(9)
    parts = []
    done = 0
    while done < height:
        n = min(block_rows, height - done)
        parts.append(comp.compress(block if n == block_rows else row * n))
        done += n
    parts.append(comp.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _png_bomb()


def _noise(size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0) -> Image.Image:
    n = size[0] * size[1] * len(mode)
    return Image.frombytes(mode, size, random.Random(seed).randbytes(n))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- the five bad inputs -----------------------------------------------------------------------


def test_zero_bytes() -> None:
    with pytest.raises(InvalidInput) as ei:
        decode_image(b"", max_pixels=LIMIT)
    assert ei.value.code == "invalid_input"
    assert ei.value.message == "empty input: 0 bytes"


def test_random_bytes() -> None:
    data = random.Random(1).randbytes(4096)
    with pytest.raises(InvalidInput) as ei:
        decode_image(data, max_pixels=LIMIT)
    assert ei.value.code == "invalid_input"
    assert "not a PNG, JPEG, WEBP, GIF, BMP or TIFF" in ei.value.message
    assert "unrecognised binary data" in ei.value.message
    assert "4,096 bytes" in ei.value.message


def test_text_file_named_png() -> None:
    data = b"hello, I am a text file called cat.png\nnot an image at all\n"
    with pytest.raises(InvalidInput) as ei:
        decode_image(data, max_pixels=LIMIT)
    assert ei.value.code == "invalid_input"
    assert "look like text" in ei.value.message
    assert "hello, I am a text file" in ei.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(fmt: str) -> None:
    data = _encode(_noise((128, 96)), fmt)
    cut = data[: len(data) // 2]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(InvalidInput) as ei:
        decode_image(cut, max_pixels=LIMIT)
    assert type(ei.value) is InvalidInput
    assert ei.value.code == "invalid_input"
    assert ei.value.message.startswith("truncated or corrupt image: ")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert isinstance(ei.value.__cause__, Exception)  # the Pillow error is chained, not leaked


def test_decompression_bomb_png(bomb: bytes) -> None:
    assert len(bomb) < 1_000_000  # cheap to build, 900 MP when decoded
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputTooLarge) as ei:
        decode_image(bomb, max_pixels=LIMIT)
    assert ei.value.code == "input_too_large"
    assert ei.value.message == (
        "image is 30000x30000 = 900,000,000 pixels; the limit is 40,000,000 pixels"
    )
    assert Image.MAX_IMAGE_PIXELS == before  # the global limit is not touched
    # Pillow itself agrees that this is a bomb (a valid PNG header, not garbage).
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))


_PEAK_PROBE = """
import sys
from loom.errors import InputTooLarge
from loom.media import decode_image

def peak_kb():  # this process's own high-water RSS (ru_maxrss would include the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
before = peak_kb()
try:
    decode_image(data, max_pixels=int(sys.argv[2]))
except InputTooLarge as exc:
    print("REFUSED", exc.message)
print("GROWTH_KB", peak_kb() - before)
"""


def test_bomb_is_refused_before_its_pixels_are_allocated(tmp_path: Path) -> None:
    # 16000x16000 one-bit pixels: ~100 KB of PNG, 256 MB once decoded (one byte per pixel).
    # The message alone cannot tell a refusal from the header from one after a full decode;
    # the peak memory of a fresh process can: VmHWM (its high-water RSS) right before the call
    # (bytes already loaded) and after it.
    if not Path("/proc/self/status").is_file():
        missing("Linux /proc (to read the peak RSS)")  # skips locally, fails under CI=true
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bomb(16_000, 16_000))
    proc = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(path), str(LIMIT)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED image is 16000x16000 = 256,000,000 pixels" in proc.stdout, proc.stdout
    growth_mb = int(proc.stdout.split("GROWTH_KB ")[1]) / 1024
    assert growth_mb < 40, f"refusing the bomb raised the peak RSS by {growth_mb:.0f} MB"


def test_pixel_limit_is_per_call() -> None:
    data = _encode(Image.new("RGB", (100, 100), "red"), "PNG")
    with pytest.raises(InputTooLarge, match=r"100x100 = 10,000 pixels; the limit is 9,999"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)


# --- valid inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "ext", "lossless"),
    [
        ("PNG", "png", True),
        ("JPEG", "jpg", False),
        ("WEBP", "webp", True),
        ("BMP", "bmp", True),
        ("TIFF", "tiff", True),
    ],
)
def test_valid_decode(fmt: str, ext: str, lossless: bool) -> None:
    src = _noise((64, 48))
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(src, fmt, **kw)
    assert image_format(data) == ext
    im = decode_image(data, max_pixels=LIMIT)
    assert im.mode == "RGB" and im.size == (64, 48)
    if lossless:
        assert im.tobytes() == src.tobytes()


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    data = buf.getvalue()
    assert image_format(data) == "gif"
    im = decode_image(data, max_pixels=LIMIT)
    assert im.mode == "RGB" and im.size == (20, 10)
    assert im.getpixel((5, 5)) == (255, 0, 0)


def test_alpha_composited_over_white() -> None:
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_image(_encode(im, "PNG"), max_pixels=LIMIT)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((3, 3)) == (255, 255, 255)


def test_palette_transparency_and_16bit_grey() -> None:
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 1
    out = decode_image(_encode(p, "PNG", transparency=1), max_pixels=LIMIT)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.new("I;16", (4, 4), 0x8000)
    out = decode_image(_encode(grey16, "PNG"), max_pixels=LIMIT)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_applied(fmt: str) -> None:
    # Stored 40x20: left half red, right half blue. Orientation 6 = "rotate 90 CW to display":
    # displayed 20x40 with red on top.
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(src, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    im = decode_image(data, max_pixels=LIMIT)
    assert im.size == (20, 40)
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


# --- helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "seen"),
    [
        (b"%PDF-1.7\n...", "a PDF document"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "an HTML document"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "an SVG image"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF/HEIC"),
        (b"PK\x03\x04" + b"\x00" * 30, "a ZIP archive"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", "RIFF container"),
    ],
)
def test_image_format_names_what_was_seen(data: bytes, seen: str) -> None:
    with pytest.raises(InvalidInput, match=seen):
        image_format(data)


def test_corrupt_header_of_whitelisted_format() -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # PNG magic, garbage after it
    with pytest.raises(InvalidInput, match="corrupt"):
        decode_image(data, max_pixels=LIMIT)
    data = b"GIF89a" + os.urandom(64)
    with pytest.raises(InvalidInput):
        decode_image(data, max_pixels=LIMIT)


def test_encode_png_roundtrip_and_sha() -> None:
    src = _noise((16, 8))
    data = encode_png(src)
    assert image_format(data) == "png"
    assert decode_image(data, max_pixels=LIMIT).tobytes() == src.tobytes()
    assert encode_png(src) == data
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_media_imports_no_torch() -> None:
    import subprocess

    code = (
        "import sys, loom.media; "
        "bad = [m for m in ('torch', 'pipeline', 'worker', 'api') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mutated_images_only_raise_loom_errors() -> None:
    """Flipped bytes, cuts and insertions in valid files of every format: a decoded RGB image or
    an InvalidInput, never a raw Pillow exception."""
    rnd = random.Random(0)
    src = _noise((32, 24))
    seeds = [_encode(src, f) for f in ("PNG", "JPEG", "BMP", "TIFF", "GIF")]
    seeds += [_encode(src, "WEBP", lossless=True), _encode(_noise((16, 16), "RGBA"), "PNG")]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(700):
        data = bytearray(rnd.choice(seeds))
        op = rnd.random()
        if op < 0.5:
            for _ in range(rnd.randint(1, 8)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif op < 0.8:
            data = data[: rnd.randrange(len(data))]
        else:
            at = rnd.randrange(len(data))
            data[at:at] = rnd.randbytes(rnd.randint(1, 64))
        try:
            im = decode_image(bytes(data), max_pixels=1_000_000)
        except InvalidInput:  # includes InputTooLarge (a flipped size field)
            outcomes["error"] += 1
        else:
            assert im.mode == "RGB"
            outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
