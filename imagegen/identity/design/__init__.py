"""Designing a fictional character from a description: describe -> pick -> turnaround -> curate -> register.

- ``grid.py``: prompts and the turnaround grid (``configs/turnaround.yaml``);
- ``recipe.py``: every rendered image's recipe, pixel digests, the recipe chain behind ``synthetic``;
- ``store.py``: designs at rest (two tables, one folder of bytes per design; tenant-owned, expiring);
- ``checks.py``: the face check under every image (face, apparent age, protected match);
- ``drafts.py``: the pick's draft identity, rendered before any character exists;
- ``flow.py``: the steps, shared by the CLI (``cli.py``) and the HTTP service (``imagegen/serve/designs.py``).
"""
