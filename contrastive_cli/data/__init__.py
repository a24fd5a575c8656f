"""Images from a folder: scan, decode, the decoded-image cache, seeded batch order, prefetch."""
