"""``loom submit caption|ask|generate`` (remote, through loom.client) and the input helpers that
the embedded commands in worker/cli.py share: finding images, reading questions and prompts."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Annotated, Any

import typer

from loom.cli import ApiOpt, KeyOpt, _remote, app, console, err, fail, follow, print_job

submit_app = typer.Typer(help="Submit a job to a Loom API (remote; needs --api).",
                         no_args_is_help=True)
app.add_typer(submit_app, name="submit")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


# --- shared input helpers ---------------------------------------------------------------------


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


def read_questions(path: Path) -> list[dict[str, Any]]:
    """Rows ``{"file", "question", ...}``; ``file`` relative to the cwd or to the JSONL's folder."""
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
        if not isinstance(row, dict) or not row.get("file") or not row.get("question"):
            raise fail(f"{path}:{n}: expected an object with 'file' and 'question'")
        rows.append(row)
    if not rows:
        raise fail(f"{path}: no questions")
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
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        err.print(f"seed: {seed} (pass --seed {seed} to reproduce)")
    return seed


def expand_prompts(prompts: list[str], seed: int, variants: int) -> list[tuple[str, int]]:
    """(prompt, seed) per item: each prompt ``variants`` times; item i uses seed + i."""
    pairs = [p for p in prompts for _ in range(variants)]
    return [(p, seed + i) for i, p in enumerate(pairs)]


def _image_item(src: str, name: str | None = None) -> dict[str, Any]:
    if src.startswith(("http://", "https://")):
        return {"image_url": src, "metadata": {"file": src}}
    data = base64.b64encode(Path(src).read_bytes()).decode()
    return {"image_base64": data, "metadata": {"file": name or src}}


# --- remote submission --------------------------------------------------------------------------

Wait = Annotated[bool, typer.Option("--wait", help="Follow progress until the job finishes.")]
Model = Annotated[str | None, typer.Option(help="Model name (default: the server's).")]
Priority = Annotated[int, typer.Option(min=0, max=9, help="0 (default) .. 9 (most urgent).")]
Idem = Annotated[str | None, typer.Option("--idempotency-key", help="Retry-safe submission key.")]


def _need_api(api: str | None) -> str:
    if not api:
        raise fail("remote submission needs --api URL (or LOOM_API_URL)")
    return api


def _submitted(c: Any, job: dict[str, Any], wait: bool) -> None:
    console.print(f"submitted job [bold]{job['id']}[/bold] ({job['item_count']} items)")
    if wait:
        print_job(follow(c.status, job["id"], 1.0))


@submit_app.command("caption")
def submit_caption(
    sources: Annotated[list[str], typer.Argument(help="Image files, directories or URLs.")],
    model: Model = None, priority: Priority = 0, idempotency_key: Idem = None, wait: Wait = False,
    api: ApiOpt = None, api_key: KeyOpt = None,
) -> None:
    """Caption images: local files are uploaded, URLs are fetched by the workers."""
    urls = [s for s in sources if s.startswith(("http://", "https://"))]
    local = collect_images([s for s in sources if s not in urls]) if len(urls) < len(sources) else []

    def run(c: Any) -> None:
        if urls:
            items = [_image_item(u) for u in urls] + [_image_item(str(p), n) for p, n in local]
            job = c.submit("caption", items, model=model, priority=priority,
                           idempotency_key=idempotency_key)
        else:
            job = c.submit_files("caption", [p for p, _ in local], names=[n for _, n in local],
                                 model=model, priority=priority, idempotency_key=idempotency_key)
        _submitted(c, job, wait)

    _remote(run, _need_api(api), api_key)


@submit_app.command("ask")
def submit_ask(
    image: Annotated[str | None, typer.Argument(help="Image file or URL.")] = None,
    question: Annotated[str | None, typer.Argument()] = None,
    questions: Annotated[Path | None, typer.Option(help="JSONL rows {file, question}.")] = None,
    model: Model = None, priority: Priority = 0, idempotency_key: Idem = None, wait: Wait = False,
    api: ApiOpt = None, api_key: KeyOpt = None,
) -> None:
    """Ask questions about images (IMAGE QUESTION, or --questions FILE.jsonl)."""
    if questions:
        rows = read_questions(questions)
        items = []
        for r in rows:
            src = str(r["file"])
            if not src.startswith(("http://", "https://")):
                src = str(resolve_file(src, questions.parent))
            items.append({**_image_item(src, str(r["file"])), "question": r["question"]})
    elif image and question:
        items = [{**_image_item(image), "question": question}]
    else:
        raise fail("give IMAGE QUESTION or --questions FILE.jsonl")

    def run(c: Any) -> None:
        job = c.submit("vqa", items, model=model, priority=priority,
                       idempotency_key=idempotency_key)
        _submitted(c, job, wait)

    _remote(run, _need_api(api), api_key)


@submit_app.command("generate")
def submit_generate(
    prompt: Annotated[str | None, typer.Argument()] = None,
    prompts: Annotated[Path | None, typer.Option(help="Text file, one prompt a line.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Item i uses SEED + i.")] = None,
    variants: Annotated[int, typer.Option(min=1, max=64, help="Images per prompt.")] = 1,
    model: Model = None, priority: Priority = 0, idempotency_key: Idem = None, wait: Wait = False,
    api: ApiOpt = None, api_key: KeyOpt = None,
) -> None:
    """Generate images from prompts (PROMPT, or --prompts FILE.txt)."""
    pairs = expand_prompts(read_prompts(prompt, prompts), choose_seed(seed), variants)
    items = [{"prompt": p, "seed": s} for p, s in pairs]

    def run(c: Any) -> None:
        job = c.submit("generate", items, model=model, priority=priority,
                       idempotency_key=idempotency_key)
        _submitted(c, job, wait)

    _remote(run, _need_api(api), api_key)
