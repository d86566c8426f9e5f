"""The example app's Reflex configuration (`reflex run` reads it from this directory)."""

import reflex as rx

config = rx.Config(
    app_name="listeners_example",
    # No plugins: the page is plain HTML elements, so the frontend needs only Reflex's own
    # packages (pinned in reflex.lock/); no sitemap, Tailwind or Radix themes to build.
    plugins=[],
    disable_plugins=[rx.plugins.SitemapPlugin],
    telemetry_enabled=False,
)
