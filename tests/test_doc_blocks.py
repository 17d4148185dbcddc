"""Every Python code block of README.md and docs/ runs as written: the blocks of a page in order,
in one namespace (as a reader goes down the page), after the small preamble of what a reader
already has (doc_preamble.py: a model, its optimizer and loader, the helpers the blocks call), in
a fresh directory. A page's torch.distributed blocks run as a one-process group."""

import re
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
from doc_preamble import names_for

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line, source) of each ```python block of `page`, de-indented (a block inside a list item)."""
    text = page.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        indent = len(match.group(1))
        source = "".join(line[indent:] for line in match.group(2).splitlines(keepends=True))
        blocks.append((text[: match.start()].count("\n") + 2, source))
    return blocks


PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]


def test_the_front_pages_have_code():
    names = {page.name for page in PAGES_WITH_CODE}
    assert {"README.md", "integrations.md", "posthoc.md", "distributed.md"} <= names


@pytest.fixture
def one_process_group(monkeypatch):
    """What torchrun sets for a world of one, so a block's `dist.init_process_group()` runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(name, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: page.name)
def test_page_blocks_run(page, tmp_path, monkeypatch, one_process_group):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(page)
    namespace = names_for("".join(source for _, source in blocks))
    for line, source in blocks:
        code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
        exec(code, namespace)  # a failure's traceback names the page and the block's first line
