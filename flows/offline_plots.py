"""Set-up step: an HTML template for ``dvc plots show`` that carries its chart library inline.

DVC's plots page loads vega, vega-lite and vega-embed from a CDN, so it stays blank without network. This
fetches the same versions from the npm registry (``npm pack``, once), inlines their builds into a template
and points DVC at it (``plots.html_template`` in ``.dvc/config.local``). ``make install`` runs it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from dvc_render.vega import VegaRenderer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Where `make install` writes the template (ignored by git); .dvc/config.local points DVC to it.
DEFAULT_TEMPLATE = PROJECT_ROOT / ".cache" / "dvc-plots" / "offline.html"

# DVC's page holds the placeholders {refresh_tag} and {plot_divs}; without {scripts} it adds no CDN links.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
INLINE_SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def cdn_packages() -> list[tuple[str, str]]:
    """(name, version) of each script DVC's own page loads from the CDN, in load order."""
    return re.findall(r"/npm/([\w-]+)@([\w.-]+)", VegaRenderer.SCRIPTS)


def fetch_tarballs(packages: list[tuple[str, str]], cache_dir: Path) -> list[Path]:
    """The npm tarball of each package, fetched with ``npm pack`` into ``cache_dir`` unless already there."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarballs = [cache_dir / f"{name}-{version}.tgz" for name, version in packages]
    missing = [f"{name}@{version}" for (name, version), tarball in zip(packages, tarballs) if not tarball.is_file()]
    if missing:
        subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(cache_dir), *missing], check=True,
                       stdout=subprocess.DEVNULL)
    return tarballs


def browser_build(tarball: Path, name: str) -> str:
    """The minified browser build of package ``name`` inside its npm tarball."""
    with tarfile.open(tarball) as archive:
        return archive.extractfile(f"package/build/{name}.min.js").read().decode()


def build_page(packages: list[tuple[str, str]], tarballs: list[Path]) -> str:
    """The plots page template with every package's build inlined, in load order."""
    scripts = "\n".join(f"    <script>\n{browser_build(tarball, name)}\n    </script>"
                        for (name, _), tarball in zip(packages, tarballs))
    return PAGE.replace("INLINE_SCRIPTS", scripts)


def main() -> None:
    """Write the template to DEFAULT_TEMPLATE and register it with DVC for this checkout."""
    packages = cdn_packages()
    tarballs = fetch_tarballs(packages, DEFAULT_TEMPLATE.parent / "npm")
    partial = DEFAULT_TEMPLATE.with_suffix(".partial")
    partial.write_text(build_page(packages, tarballs))
    partial.replace(DEFAULT_TEMPLATE)
    # DVC reads a relative template path from its own folder, .dvc/
    template = os.path.relpath(DEFAULT_TEMPLATE, PROJECT_ROOT / ".dvc")
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", template], check=True,
                   cwd=PROJECT_ROOT)


if __name__ == "__main__":
    main()
