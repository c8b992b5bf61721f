"""MkDocs hook: pages included from elsewhere in the repository (experiments/README.md
through docs/experiments.md) link their figures as ``../docs/NAME.png``, right on
GitHub; on the site those figures sit one level up from the page."""


def on_page_content(html, page, config, files):
    return html.replace('src="../docs/', 'src="../')
