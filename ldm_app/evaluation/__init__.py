"""Built-in evaluation of a shapes text-to-image model.

- `judge`: the attribute judge, a small CNN trained on fresh renders of `ldm_app.data.shapes` (cached, gated at
  99% held-out accuracy per attribute before it judges anything).
- `adherence`: prompt adherence (per-attribute and relation accuracy) and a domain KID on the judge's features;
  `python -m ldm_app.evaluate ldm ...`, or `run_adherence(pipe, ...)` for settings sweeps that reuse one pipeline and judge.
"""
