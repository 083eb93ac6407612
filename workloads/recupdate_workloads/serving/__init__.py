"""Serving a release: the HTTP app, the Ray Serve deployment, its command and the demo store."""
