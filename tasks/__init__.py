"""Built-in task plugins of gpg-vl, installed as the package `gpg_vl_tasks`."""
