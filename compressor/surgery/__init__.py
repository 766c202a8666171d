"""Model surgery: the one place that edits models.

- `edit`: deleting blocks, folding maps into weights, fixing configs and cache indices (in place);
- `plan`: the Plan (what to remove, which spans a linear map replaces), read, written and applied.
"""
