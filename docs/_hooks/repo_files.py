"""MkDocs hook: images that live outside docs/ (benchmark charts, example outputs).

The pages link them as `../benchmarks/...png`, which is right when the Markdown is read
in the repository (on GitHub, in an editor). For the site, this hook copies every such
image into it under the same repository path and rewrites the link to match. A link
to an image that does not exist fails the build.
"""

import os
import re

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = re.compile(r"\]\(\.\./([^)\s]+\.(?:png|svg|jpg))\)")


def _referenced_images(docs_dir):
    found = set()
    for dirpath, _, names in os.walk(docs_dir):
        for name in names:
            if name.endswith(".md"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    found.update(IMAGE.findall(f.read()))
    return sorted(found)


def on_files(files, config):
    for rel in _referenced_images(config["docs_dir"]):
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            raise PluginError(f"docs link an image that does not exist: {rel}")
        files.append(File.generated(config, rel, abs_src_path=path))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # pages in subfolders link one level further up
    return IMAGE.sub(lambda m: "](" + "../" * depth + m.group(1) + ")", markdown)
