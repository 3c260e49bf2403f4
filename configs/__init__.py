"""The recipes, installed as the package `gpg_vl_recipes` (see pyproject.toml) so that a plain
`pip install gpg-vl` ships them: `gpg-vl train --task NAME` reads `NAME.yaml` here (gpg_vl/recipes.py).
The launcher configs in accelerate/ and deepspeed/ ship too. This folder holds no code.
"""
