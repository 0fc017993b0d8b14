"""MkDocs hook: load the Sphinx inventories vendored in docs/_inventories/.

mkdocs.yml lists each inventory as a path relative to mkdocs.yml plus the `base_url`
of the project's online documentation, so links point at the real pages while the
build itself reads no network. mkdocstrings only fetches URLs, so before it starts
this turns each relative path into a `file://` URL. mkdocs caches what it fetches for
a day, keyed by URL; the URL carries a hash of the file as its fragment (which
urllib does not pass on to the file system), so a regenerated inventory is read at
once rather than a stale cached copy.

Regenerate the inventories with docs/_scripts/make_inventories.py.
"""

import hashlib
import pathlib

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority


@event_priority(100)  # Before mkdocstrings' on_config, which starts the downloads.
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    root = pathlib.Path(config.config_file_path).resolve().parent
    python = config.plugins["mkdocstrings"].config["handlers"]["python"]
    for inventory in python.get("inventories", []):
        if not isinstance(inventory, dict) or "://" in inventory["url"]:
            continue
        path = (root / inventory["url"]).resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"inventory {path} is missing; run docs/_scripts/make_inventories.py"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        inventory["url"] = f"{path.as_uri()}#sha256-{digest}"
    return config
