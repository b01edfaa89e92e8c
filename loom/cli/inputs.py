"""Reading what the user points the CLI at: image files and folders, question rows, prompts,
and the seeds of seeded tasks. Shared by the embedded commands and ``loom submit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loom import tasks
from loom.cli.common import err, fail

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}



def collect_images(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, display name) for files and (recursively) directories. A file named explicitly is
    taken whatever its suffix (a bad one fails its own item); a directory contributes the files
    with image suffixes, named relative to that directory."""
    found: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((f, f.relative_to(p).as_posix()))
        elif p.is_file():
            found.append((p, raw))
        else:
            raise fail(f"no such file or directory: {raw}")
    if not found:
        raise fail("no images found in " + ", ".join(paths))
    return found


def read_questions(path: Path, fields: tuple[str, ...] = ("question",)) -> list[dict[str, Any]]:
    """Rows ``{"file", <fields>..., ...}``; ``file`` relative to the cwd or the JSONL's folder."""
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise fail(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not row.get("file") or not all(row.get(f) for f in fields):
            raise fail(f"{path}:{n}: expected an object with 'file' and "
                       + " and ".join(repr(f) for f in fields))
        rows.append(row)
    if not rows:
        raise fail(f"{path}: no rows")
    return rows


def resolve_file(name: str, base: Path) -> Path:
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    return base / p


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    if prompt and prompts_file:
        raise fail("give a PROMPT or --prompts FILE, not both")
    if prompts_file:
        try:
            prompts = [ln.strip() for ln in prompts_file.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise fail(f"cannot read {prompts_file}: {exc.strerror}") from None
    elif prompt:
        prompts = [prompt]
    else:
        raise fail("give a PROMPT or --prompts FILE")
    if not prompts:
        raise fail(f"{prompts_file}: no prompts")
    return prompts


def choose_seed(seed: int | None) -> int:
    """The base seed of a seeded run: the user's, else a random one that is printed."""
    if seed is None:
        seed = tasks.item_seed(given=None, base=None, index=0)
        err.print(f"seed: {seed} (pass --seed {seed} to reproduce)")
    return seed


def expand_prompts(prompts: list[str], seed: int, variants: int) -> list[tuple[str, int]]:
    """(text, seed) per item: each text ``variants`` times; item i uses the seed policy of
    ``loom.tasks.item_seed`` (base seed + i)."""
    pairs = [p for p in prompts for _ in range(variants)]
    return [(p, tasks.item_seed(given=None, base=seed, index=i)) for i, p in enumerate(pairs)]
