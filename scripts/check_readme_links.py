"""Check that every link in README.md to this repository names a file (and, for a
Markdown file, a heading) that exists in the checkout.

README.md is the package's long description on the package index, where relative
links are dead, so its links are absolute: ``REPO/blob/main/<path>`` or
``REPO/tree/main/<dir>``. A relative link is an error for the same reason.
Exit 1 listing the broken links.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO = "https://github.com/django-ocmemcache/django-ocmemcache"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's and MkDocs' anchor for a heading (lowercase, punctuation dropped)."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {slug(line.lstrip("#")) for line in lines if line.startswith("#")}


def problems(readme: Path) -> list[str]:
    out = []
    for target in LINK.findall(readme.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            if not target.startswith(REPO + "/"):
                continue  # another site
            rest = target[len(REPO) + 1 :]
            m = re.match(r"(blob|tree)/main/([^#]*)(?:#(.*))?$", rest)
            if rest in ("issues", "") or rest.startswith("issues/"):
                continue
            if m is None:
                out.append(f"{target}: not a blob/main or tree/main link")
                continue
            path = ROOT / m[2]
            if not path.exists():
                out.append(f"{target}: {m[2]} does not exist")
            elif m[3] and path.suffix == ".md" and m[3] not in anchors(path):
                out.append(f"{target}: no heading #{m[3]} in {m[2]}")
        elif not target.startswith("#"):
            out.append(f"{target}: relative link (dead on the package index)")
    return out


if __name__ == "__main__":
    found = problems(ROOT / "README.md")
    for line in found:
        print(f"README.md: {line}", file=sys.stderr)
    print(f"README.md links: {'ok' if not found else f'{len(found)} broken'}")
    sys.exit(1 if found else 0)
