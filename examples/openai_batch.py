"""Caption a folder of images through Loom's OpenAI-compatible Batch API, with only the `openai`
SDK, and check the captions against FOLDER/expected.jsonl ({"file", "expected_caption"} rows).

    export OPENAI_BASE_URL=http://localhost:8000/openai/v1 OPENAI_API_KEY=loom_...
    python examples/openai_batch.py examples/images
"""

import base64
import json
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

folder = Path(sys.argv[1])
rows = [json.loads(line) for line in (folder / "expected.jsonl").read_text().splitlines()]
client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment

# 1. One chat request per image: the image as a data URL, no question, so a caption.
requests = Path(tempfile.mkdtemp()) / "requests.jsonl"
with requests.open("w") as out:
    for row in rows:
        data = base64.b64encode((folder / row["file"]).read_bytes()).decode()
        out.write(json.dumps({
            "custom_id": row["file"], "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "loom-shapes", "max_tokens": 32, "messages": [{
                "role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                    {"type": "text", "text": "Describe this image."}]}]}}) + "\n")

# 2. Upload it, create the batch, wait for it.
upload = client.files.create(file=requests.open("rb"), purpose="batch")
batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(2)
    batch = client.batches.retrieve(batch.id)
    print(batch.status, batch.request_counts, flush=True)
if batch.status == "failed":
    sys.exit(f"batch failed: {batch.errors}")

# 3. Download the output (and error) file; one line per request, matched by custom_id.
captions = {}
if batch.output_file_id:
    for line in client.files.content(batch.output_file_id).text.splitlines():
        result = json.loads(line)
        body = result["response"]["body"]
        captions[result["custom_id"]] = body["choices"][0]["message"]["content"]
if batch.error_file_id:
    print(client.files.content(batch.error_file_id).text)
right = sum(captions.get(row["file"]) == row["expected_caption"] for row in rows)
print(f"{right}/{len(rows)} captions right")
sys.exit(0 if right == len(rows) else 1)
