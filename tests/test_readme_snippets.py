"""The README's "Use it from…" snippets run as written against the live app."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Use it from…", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_use_it_from_snippets_run(live_app, capsys):
    blocks = snippets()
    assert len(blocks) == 5, "client, OpenAI, LangChain, LlamaIndex, CloudEvents"
    for i, code in enumerate(blocks):
        code = code.replace("http://127.0.0.1:8700", live_app.url)  # the only change
        exec(compile(code, f"README.md snippet {i + 1}", "exec"), {})
    out = capsys.readouterr().out
    assert "notes/undo.md" in out  # the client's search and the OpenAI citations
    assert "'notes/squash.md'" in out  # LangChain's retriever, after the store's write
    assert "'accepted': 1" in out and "'tenant': 'tenant-a'" in out  # CloudEvents over HTTP
